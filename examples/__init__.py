"""distaccum's examples. A package so that the benchmark harness runs from the repository root as
``python -m examples.bench.harness``; the example scripts themselves run as files (``python examples/train.py``)."""
