"""Metrics: the worker's request counters (counters.py, imported by the worker's hot
path, so it imports nothing heavy), their compact snapshot (snapshot.py, the bytes a
heartbeat carries), the primary's pure aggregator (aggregate.py), and the shell that
serves /metrics from the primary (exporter.py, appmetrics.py, listenq.py)."""
