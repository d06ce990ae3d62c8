"""Benchmarks of exported and quantized artifacts: latency, memory, size, SNR and top-1.

Every backend contributes records of one shape (``effdeploy.bench.record.Record``), one per
(artifact, backend, device, threads, options), so the desk, the phone and the Edge TPU print in
one table and land in one JSON file.
"""
