"""ktproxy benchmarks: `python -m benchmarks [--quick] [--case NAME...]` (see harness.py)."""
