"""megatron-rwkvx: Megatron-core based distributed pretraining for RWKV-X hybrid language models.

Light at import time: ``megatron_rwkvx.kernels`` must stay importable without megatron-core.
The console's warning filters go in first, before any of our modules imports megatron-core.
"""
from megatron_rwkvx.console import install_warning_filters

install_warning_filters()

__version__ = "0.1.0"


def load_pretrained(path, device="cpu", **kwargs):
    """See :func:`megatron_rwkvx.pretrained.load_pretrained`."""
    from megatron_rwkvx.pretrained import load_pretrained as _load

    return _load(path, device=device, **kwargs)


__all__ = ["load_pretrained", "__version__"]
