"""Benchmarks of the hybridml kit: ``python -m benchmarks.run [--quick] [--only NAME]``.

One module per measured item (latency, throughput, memory, cold start, size, serving, fleet,
small device, fallback); :mod:`benchmarks.workspace` trains the models they share and
:mod:`benchmarks.report` writes ``benchmarks/results/REPORT.md`` with tables and plots.
"""
