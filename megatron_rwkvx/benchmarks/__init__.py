"""Benchmarks that are more than one script: ``gpu_check`` (``tools/gpu_check.py``: the kernels
and layers on a GPU) and ``gpu_train_check`` (``tools/gpu_train_check.py``: the trainer on a GPU);
``checkout`` lets both commands run from an uninstalled checkout."""
