"""pvio's test suite (pytest, pytest-trio) and benchmarks (tests/bench)."""
