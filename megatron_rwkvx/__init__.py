"""megatron-rwkvx: Megatron-core based distributed pretraining for RWKV-X hybrid language models.

Light at import time: ``megatron_rwkvx.kernels`` must stay importable without megatron-core.
"""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu", **kwargs):
    """See :func:`megatron_rwkvx.pretrained.load_pretrained`."""
    from megatron_rwkvx.pretrained import load_pretrained as _load

    return _load(path, device=device, **kwargs)


__all__ = ["load_pretrained", "__version__"]
