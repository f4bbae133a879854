"""The benchmark package: ``python -m pipeline.bench <name>``.

Each benchmark writes a JSON results file (machine, parameters, results) and
prints a table; ``docs/benchmarks.md`` records the numbers measured with them.
"""
