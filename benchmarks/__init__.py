"""batchd's benchmark harness: `python -m benchmarks run SCENARIO`."""
