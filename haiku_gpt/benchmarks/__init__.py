"""Benchmarks that print numbers (not tests: nothing here asserts a time).

  python -m haiku_gpt.benchmarks.bench --what=train|sample|attention|nanogpt|kernels|checkpoint|gpu
  python -m haiku_gpt.benchmarks.prepare_bench
"""
