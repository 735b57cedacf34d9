"""Benchmark harness for dpengine: per-sample clipping throughput and memory, against non-private
training and Opacus, plus an accounting micro-benchmark (``dpengine bench``).

Layout: ``models`` (the benchmarked networks), ``suite`` (TOML suites -> frozen dataclasses),
``worker`` (one configuration in a fresh process, one JSON line out), ``runner`` (round-robin
scheduling, aggregation, ratios), ``report`` (CSV, markdown, plot) and ``cli`` (the click command).
"""
