"""Speed benchmarks (never part of the test suite's pass/fail); see benchmarks/README.md."""
