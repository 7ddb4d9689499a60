"""The moe-lora benchmark suite (see benchmarks/run.py and docs/performance.md)."""
