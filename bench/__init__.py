"""Benchmarks: scenarios that run the real processes (redis-server, ``broker edge``) against
baselines, and report throughput, latency and the CPU/memory/Redis cost of each.

``python -m bench.b1 --viewers 1,100,1000``: B1 fan-out (one generation, V viewers, one edge),
the broker's edge side by side with a naive one-subscription-per-viewer edge. See README.md.
"""
