"""The prepared GPU check of the kernels and layers (run as ``tools/gpu_check.py``).

Modules, one job each, none doing work at import: ``cli`` (arguments and the run's settings),
``bench`` (device, clock, timing and error helpers shared by the sections), ``correctness``,
``layers`` (the timed RWKV-7 / sparse / dense layers, built from ``megatron_rwkvx.layers``),
``timing`` (the main table and the ``auto`` choice per length), ``breakdown`` (per-kernel
profile), ``sweeps`` (WKV-7 and sparse-attention variants), ``run`` (the sections in order, the
JSON and the tables). ``docs/benchmarks/gpu.md`` describes what each section measures.
"""
