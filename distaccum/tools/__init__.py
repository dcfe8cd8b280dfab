"""User-facing tools of the ``distaccum`` command: ``env``, ``plan`` and ``survey`` (what a user runs before launching
or while training; the benchmark harness lives next to its results, in ``examples/bench/harness``).

They use the library only through its public API and are never imported by ``import distaccum``, so the
training path never loads argparse, matplotlib or scikit-learn.
"""
