"""``distaccum`` command line: ``env``, ``survey``, ``plan``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; the
module is imported only when its command runs, so ``distaccum env`` never imports matplotlib or DeepSpeed. The
benchmark harness is not shipped: it runs from a checkout, ``python -m examples.bench.harness``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "env": ("distaccum.tools.envcheck", "what this process sees: launcher, ranks, backend, device, plan"),
    "survey": ("distaccum.tools.survey", "learning-rate survey: real vs virtual batch vs small batch"),
    "plan": ("distaccum.tools.planner", "batch arithmetic, elastic world sizes, gradient traffic per sync mode"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distaccum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, add_help=False)
        sub.set_defaults(_module=module_name)
        # The command's own arguments (and its --help) are parsed by its module, imported only when chosen.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distaccum`` script and ``python -m distaccum``."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(prog=f"distaccum {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(sub)
    args = sub.parse_args(list(sys.argv[1:] if argv is None else argv)[1:])
    return int(module.run(args) or 0)
