"""``python -m examples.bench.harness [options]``, from the repository root (``--help`` lists the options)."""

import sys

from examples.bench.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
