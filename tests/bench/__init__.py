"""Benchmarks (pytest-benchmark): run with ``make bench``; ``make test`` runs each once, unmeasured."""
