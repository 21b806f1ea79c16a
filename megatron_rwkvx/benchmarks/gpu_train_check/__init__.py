"""The trainer on a GPU (run as ``tools/gpu_train_check.py``): the real ``megatron_rwkvx.pretrain``
loop (``training.loop.set_up`` and ``train_step``) in bf16 with the Triton kernels, one process per
configuration (``--smoke``: the fp32 reference in a process of its own, the rest in one).

Modules, none doing work at import: ``cli`` (arguments), ``cases`` (the configurations in the order
they run, and the trainer arguments of each), ``worker`` (one configuration through the loop in this
process: losses, step times, tokens/s, MFU, peak memory and the planner's prediction), ``run``
(the loss check, the configurations under the time budget, the table and the JSON).
``docs/benchmarks/gpu_train.md`` says what it measures and how to run it.
"""
