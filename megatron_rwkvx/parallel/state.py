"""Process-group helpers for single-process use (inference, conversion tools)."""
from __future__ import annotations

import torch

from megatron.core import parallel_state


def ensure_single_process_parallel_state(seed: int = 1234) -> None:
    """Initialise a one-process gloo world and megatron's groups, unless already initialised.

    megatron-core's parallel layers ask ``parallel_state`` for their groups even with one process;
    a ``HashStore`` makes the one-rank world without touching the network.
    """
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError(
                "torch.distributed is initialised with several ranks but megatron's model-parallel "
                "groups are not: call megatron.core.parallel_state.initialize_model_parallel first"
            )
        parallel_state.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        if torch.cuda.is_available():
            model_parallel_cuda_manual_seed(seed)
