"""Side-by-side benchmark of medsum against Transformers + PEFT (`python -m bench.run`).

Not part of the product: this package imports `transformers` and `peft` as the baseline it is
measured against. See BENCHMARKS.md for the method and the latest results.
"""
