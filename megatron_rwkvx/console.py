"""A quiet console: megatron-core's import-time notices silenced, one line of our own instead.

megatron-core warns at import (and config) time, once per process, that Transformer Engine and
Apex are missing and that some options are deprecated: about ten lines per tool, repeated at
every stage of a demo and once per rank. ``install_warning_filters`` runs from the package's
``__init__`` so it precedes any megatron-core import of ours; ``accelerations_line`` says in one
line which optional accelerations a run actually uses. Only warnings attributed to megatron-core's
own modules are filtered, and only those kinds: ours and everything else still print.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Iterable

# Import-time availability notices ("Transformer Engine and Apex are not installed. Falling back
# to ...", "Apex is not installed ...") and deprecation notices ("... is deprecated").
_MEGATRON_CORE_MODULES = r"megatron\.core(\.|$)"
_MEGATRON_CORE_NOTICES = (r".*\bnot installed\b", r".*\bdeprecated\b")

# The optional packages, by import name, and how we call them.
OPTIONAL_ACCELERATIONS = (
    ("transformer_engine", "Transformer Engine"),
    ("apex", "Apex"),
    ("triton", "Triton"),
    ("fla", "fla"),
)


def install_warning_filters() -> None:
    for message in _MEGATRON_CORE_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=_MEGATRON_CORE_MODULES)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_MEGATRON_CORE_MODULES)


def installed(import_name: str) -> bool:
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def accelerations_line(kernel_backends: Iterable[str]) -> str:
    """One line: which optional packages are installed and what this run uses of them.

    ``kernel_backends`` are the backends our operators resolved to (``triton``, ``fla``, ``torch``):
    Triton and fla count as active only when an operator runs on them. Transformer Engine and Apex
    would only replace megatron-core's fused optimizer/norm helpers, for which it falls back to torch.
    """
    used = set(kernel_backends)
    parts = []
    for import_name, name in OPTIONAL_ACCELERATIONS:
        if not installed(import_name):
            state = "not installed"
        elif import_name in ("triton", "fla"):
            state = "active" if import_name in used else "installed but not used here"
        else:
            state = "installed"
        parts.append(f"{name} {state}")
    return "accelerations: " + "; ".join(parts) + " (megatron-core falls back to torch for what is missing)"
