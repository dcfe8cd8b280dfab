"""User-facing tools of the ``distaccum`` command: ``env``, ``survey`` and ``bench``.

They use the library only through its public API and are never imported by ``import distaccum``, so the
training path never loads argparse, matplotlib, scikit-learn or the benchmark's launcher.
"""
