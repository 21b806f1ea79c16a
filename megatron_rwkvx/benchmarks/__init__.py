"""Benchmarks that are more than one script: ``gpu_check`` (``tools/gpu_check.py``)."""
