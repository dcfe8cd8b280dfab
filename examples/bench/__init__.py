"""Benchmarks of distaccum, their committed results (README.md), and the harness that made them (:mod:`.harness`)."""
