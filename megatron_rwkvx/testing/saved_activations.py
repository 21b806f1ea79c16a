"""Count the bytes autograd keeps for the backward pass, on any device.

Inside :class:`SavedActivationCounter` every tensor autograd saves passes through a saved-tensor
hook; the counter records its *storage* (a view of a stored tensor, or a second save of the same
tensor, counts once; a tensor that is a slice of a larger buffer keeps, and counts, the whole
buffer). Parameters are not activations and are left out. Selective recomputation keeps the
outputs its policy saves, and the checkpoint's inputs, outside autograd's saved tensors (torch's
checkpoint holds them); the counter adds them too, so every recompute mode is counted alike.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import CheckpointPolicy

from megatron_rwkvx.models import recompute


class SavedActivationCounter:
    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: Dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _record(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and storage.nbytes():
            self.storages[ptr] = storage.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    def __enter__(self) -> "SavedActivationCounter":
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._policy = recompute._selective_policy

        def counting_policy(kept, ctx, op, *args, **kwargs):
            decision = self._policy(kept, ctx, op, *args, **kwargs)
            if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
                outputs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
                for out in outputs:
                    if isinstance(out, torch.Tensor):
                        self._record(out)
            return decision

        def counting_checkpoint(fn, *args, **kwargs):
            # torch's non-reentrant checkpoint holds its inputs for the recomputation.
            for a in args:
                if isinstance(a, torch.Tensor):
                    self._record(a)
            return self._checkpoint(fn, *args, **kwargs)

        self._checkpoint = recompute.checkpoint
        recompute._selective_policy = counting_policy
        recompute.checkpoint = counting_checkpoint
        return self

    def __exit__(self, *exc) -> None:
        recompute._selective_policy = self._policy
        recompute.checkpoint = self._checkpoint
        self._hooks.__exit__(*exc)
