"""Side-by-side benchmarks (``make bench``); each table writes bench/results/*.json and docs/benchmarks.md."""
