"""One backend registry for every operator (WKV-7, top-k chunk attention).

Role names, the same for each operator:
- ``reference``: the plain definition (token loop, dense attention); tests only, never chosen by
  ``auto``;
- ``torch``: the efficient PyTorch path, on any device; the CPU default and the exactness
  reference of ``auto``;
- ``triton``: our Triton kernels;
- an external library by its name (``fla`` for flash-linear-attention).
Old names stay as aliases (``Operator.aliases``, e.g. WKV-7's ``chunked`` = ``torch``).

Optional backends are *plug-in modules* named per operator (``Operator.plugins``): the first
request that may need one imports it, and importing it registers the backend
(``Operator.register``). A plug-in that fails to import is never swallowed: naming its backend
raises ``BackendUnavailableError`` with the import error, and ``auto`` on a GPU warns with it.

``auto`` (``Operator.choose``), per device and dtype, cached:
- one candidate (the CPU: only ``torch``): that one, with no probe;
- several (a GPU with Triton, fla, ...): each candidate runs the operator's probe (a short
  forward+backward at the run's head layout); a candidate is *exact* when every output and
  gradient is within ``tolerance(dtype)`` (rms error / rms) of the ``torch`` backend run in fp32
  on the same rounded inputs; the fastest exact candidate wins. The choice and its reason (the
  timings, the inexact or failing candidates, the broken plug-ins) are kept for the start-up log;
- a choice made by another process (``Operator.adopt``): the trainer probes on one rank and every
  rank adopts its decision (``megatron_rwkvx/training/kernel_backends.py``).
"""
from __future__ import annotations

import importlib
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_rwkvx.errors import UsageError

AUTO = "auto"
REFERENCE = "reference"
TORCH = "torch"
TRITON = "triton"

# Exactness of ``auto``'s candidates against the fp32 torch path: the operators' own accuracy
# targets (bf16/fp16 inputs carry ~3 significant digits; fp32 paths agree to rounding).
HALF_TOLERANCE = 2e-2
FP32_TOLERANCE = 1e-4
PROBE_REPS = 3
# The probe's clock (tests substitute a virtual one, so that fake backends' costs are exact).
_now = time.perf_counter


class UnknownBackendError(UsageError):
    """A backend name that no operator role or alias matches."""


class BackendUnavailableError(UsageError, RuntimeError):
    """A known backend that cannot run here: its plug-in failed to import, or not on this device."""


def tolerance(dtype: torch.dtype) -> float:
    return FP32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    # Whether it can run on tensors like x (device, interpreter).
    can_run: Callable[[torch.Tensor], bool]
    # Whether ``auto`` may consider it for tensors like x (when it can run there).
    auto: Callable[[torch.Tensor], bool]


@dataclass(frozen=True)
class Plugin:
    """A module that registers ``backend`` when imported. ``library``: the third-party package it
    wraps; when only that package is missing, ``auto`` notes it quietly (it is optional) instead
    of warning; ``hint``: how to install it."""

    backend: str
    module: str
    library: Optional[str] = None
    hint: str = ""


@dataclass(frozen=True)
class Choice:
    """The backend an operator runs for one (device, dtype), and why."""

    operator: str
    requested: str
    backend: str
    reason: str
    device: str = ""
    dtype: str = ""
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def line(self) -> str:
        how = "auto" if self.requested == AUTO else f"requested {self.requested!r}"
        where = f" on {self.device} {self.dtype}".rstrip() if self.device else ""
        return f"{self.operator}: backend {self.backend}{where} ({how}: {self.reason})"


@dataclass
class ProbeCase:
    """A short forward+backward of one operator: ``run(fn, inputs)`` returns the tensors to
    compare (outputs and gradients); ``inputs`` are in the run's dtype on its device."""

    inputs: Sequence[torch.Tensor]
    run: Callable[[Callable, Sequence[torch.Tensor]], List[torch.Tensor]]
    shape: str


def rms_ratio(got: torch.Tensor, want: torch.Tensor) -> float:
    """rms(got - want) / rms(want), in float64; inf when ``got`` is not finite."""
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], object], device: torch.device, reps: int = PROBE_REPS) -> float:
    """Median wall milliseconds of ``step()`` (synchronised on a GPU), after one untimed call."""
    step()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = _now()
        step()
        _sync(device)
        times.append((_now() - t0) * 1e3)
    return statistics.median(times)


class Operator:
    """The backends of one operator. ``probe(x, call)`` builds the ``auto`` probe for tensors like
    ``x`` and the call's options ``call`` (a dict); ``order`` ranks backends in listings."""

    def __init__(
        self,
        name: str,
        *,
        plugins: Sequence[Plugin] = (),
        aliases: Optional[Mapping[str, str]] = None,
        probe: Optional[Callable[[torch.Tensor, dict], ProbeCase]] = None,
    ):
        self.name = name
        self.plugins = {p.backend: p for p in plugins}
        self.aliases = dict(aliases or {})
        self.probe = probe
        self._backends: Dict[str, Backend] = {}
        self._load_errors: Dict[str, str] = {}
        self._loaded: set = set()
        self._auto: Dict[Tuple[str, torch.dtype], Choice] = {}
        self._auto_fn: Dict[Tuple[str, torch.dtype], Callable] = {}

    # -- registration and look-up

    def register(
        self,
        name: str,
        fn: Callable,
        can_run: Optional[Callable[[torch.Tensor], bool]] = None,
        auto: Optional[Callable[[torch.Tensor], bool]] = None,
    ) -> None:
        """Register ``fn`` as backend ``name``. ``can_run(x)``: whether it runs on x's device
        (default: any); ``auto(x)``: whether ``auto`` may pick it (default: ``can_run``)."""
        if not isinstance(name, str) or not name or name == AUTO or name in self.aliases:
            raise ValueError(f"{self.name}: invalid backend name {name!r} (reserved or an alias)")
        can_run = can_run or (lambda x: True)
        self._backends[name] = Backend(name, fn, can_run, auto or can_run)
        self.forget_choices()

    def unregister(self, name: str) -> None:
        self._backends.pop(name, None)
        self.forget_choices()

    def forget_choices(self) -> None:
        """Drop the cached ``auto`` choices (after a registration, or for a new probe)."""
        self._auto.clear()
        self._auto_fn.clear()

    def canonical(self, name: str) -> str:
        """The role name for ``name`` (an alias maps to its role); raises for an unknown name."""
        if not isinstance(name, str):
            raise TypeError(f"{self.name}: backend must be a string, got {type(name).__name__}")
        name = self.aliases.get(name, name)
        if name == AUTO or name in self._backends or name in self.plugins:
            return name
        raise UnknownBackendError(
            f"{self.name}: unknown backend {name!r}; choose one of {self.choices()}"
            + (f" (old names: {self._alias_text()})" if self.aliases else "")
        )

    def choices(self) -> List[str]:
        """Every name a user may pass (roles, without aliases), ``auto`` first."""
        return [AUTO] + sorted(set(self._backends) | set(self.plugins))

    def _alias_text(self) -> str:
        return ", ".join(f"{old!r} = {new!r}" for old, new in sorted(self.aliases.items()))

    def load(self, name: Optional[str] = None) -> None:
        """Import the plug-in module of ``name`` (every plug-in when None), once."""
        for backend, plugin in self.plugins.items():
            if (name is not None and backend != name) or backend in self._loaded:
                continue
            self._loaded.add(backend)
            try:
                importlib.import_module(plugin.module)
            except Exception as exc:  # a broken optional kernel must not break the torch path
                self._load_errors[backend] = f"{type(exc).__name__}: {exc}"
                continue
            if backend not in self._backends:
                self._load_errors[backend] = (
                    f"{plugin.module} imported but did not register backend {backend!r}"
                )

    def load_error(self, name: str) -> Optional[str]:
        """Why plug-in backend ``name`` is not registered (None when it is, or was not tried)."""
        return self._load_errors.get(name)

    def _missing_library(self, name: str) -> bool:
        plugin, err = self.plugins.get(name), self._load_errors.get(name, "")
        return bool(plugin and plugin.library and err.startswith("ModuleNotFoundError")
                    and f"'{plugin.library}" in err)

    def available(self, x: Optional[torch.Tensor] = None) -> List[str]:
        """Registered backends (those that can run on x's device when x is given)."""
        self.load()
        return sorted(n for n, b in self._backends.items() if x is None or b.can_run(x))

    def _unavailable(self, name: str, x: torch.Tensor) -> BackendUnavailableError:
        err = self.load_error(name)
        if err is not None:
            plugin = self.plugins[name]
            state = "is not installed" if self._missing_library(name) else "is unavailable"
            hint = f"; {plugin.hint}" if plugin.hint else ""
            why = f"backend {name!r} {state} ({err}){hint}"
        else:
            why = f"backend {name!r} cannot run on device {x.device}"
        return BackendUnavailableError(
            f"{self.name}: {why}; backends that can: {self.available(x)} or 'auto'"
            + (f" (old names: {self._alias_text()})" if self.aliases else "")
        )

    def resolve(self, name: str, x: torch.Tensor, call: Optional[dict] = None) -> Callable:
        """The function that runs for backend ``name`` on tensors like ``x`` (``call``: the call's
        options, for ``auto``'s probe)."""
        if name == AUTO:  # the per-call fast path
            fn = self._auto_fn.get((str(x.device), x.dtype))
            if fn is not None:
                return fn
        role = self.canonical(name)
        if role == AUTO:
            choice = self.choose(x, call or {})
            return self._backends[choice.backend].fn
        if role not in self._backends:
            self.load(role)
        backend = self._backends.get(role)
        if backend is None or not backend.can_run(x):
            raise self._unavailable(role, x)
        return backend.fn

    def report(self, name: str, x: torch.Tensor, call: Optional[dict] = None) -> Choice:
        """Which backend ``name`` runs on tensors like ``x``, and why (``auto`` probes if needed)."""
        role = self.canonical(name)
        if role == AUTO:
            return self.choose(x, call or {})
        self.resolve(role, x, call)
        return Choice(self.name, name, role, "forced by the user", str(x.device),
                      str(x.dtype).replace("torch.", ""))

    # -- auto

    def choose(self, x: torch.Tensor, call: dict) -> Choice:
        """``auto``'s choice for x's device and dtype (made once, then cached)."""
        key = (str(x.device), x.dtype)
        if key in self._auto:
            return self._auto[key]
        notes, loud = [], []
        if x.is_cuda:  # where the plug-ins matter: their import errors go into the reason
            self.load()
        for name in sorted(self.plugins) if x.is_cuda else ():
            err = self._load_errors.get(name)
            if err is None:
                continue
            if self._missing_library(name):
                notes.append(f"{name} not installed")
            else:
                loud.append(f"backend {name!r} failed to import ({err})")
        candidates = [b for b in self._backends.values() if b.can_run(x) and b.auto(x)]
        dtype = str(x.dtype).replace("torch.", "")
        if len(candidates) <= 1:
            chosen = candidates[0].name if candidates else TORCH
            reason = f"the only candidate on {x.device.type}"
            timings = {}
        else:
            chosen, reason, timings = self._race(candidates, x, call)
        if notes:
            reason += "; " + ", ".join(notes)
        if loud:
            message = (f"{self.name}: on {x.device} {'; '.join(loud)}; running {chosen!r} instead, "
                       f"which may be much slower. Fix the install, or name a backend to silence this")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            reason += "; WARNING: " + "; ".join(loud)
        choice = Choice(self.name, AUTO, chosen, reason, str(x.device), dtype, timings)
        self._auto[key] = choice
        self._auto_fn[key] = self._backends[chosen].fn
        return choice

    def adopt(self, choice: Choice, x: torch.Tensor) -> Choice:
        """Make ``choice``, ``auto``'s decision taken elsewhere (another rank's probe), this
        process's ``auto`` for tensors like ``x``, as if it had probed itself; refuses a backend
        that cannot run here, since running another one would break the agreement."""
        if choice.backend not in self._backends:
            self.load(choice.backend)
        backend = self._backends.get(choice.backend)
        if backend is None or not backend.can_run(x):
            raise BackendUnavailableError(
                f"auto chose {choice.backend!r} elsewhere in this job ({choice.line()}), but here "
                f"{self._unavailable(choice.backend, x)}; name a backend that every rank can run"
            )
        key = (str(x.device), x.dtype)
        self._auto[key] = replace(choice, device=str(x.device))
        self._auto_fn[key] = backend.fn
        return self._auto[key]

    def _race(self, candidates: Sequence[Backend], x: torch.Tensor, call: dict):
        """(fastest exact candidate, reason, {name: ms}) from one probe per candidate."""
        if self.probe is None or TORCH not in self._backends:
            raise RuntimeError(f"{self.name}: auto needs a probe and a {TORCH!r} backend to compare")
        tol = tolerance(x.dtype)
        # The first call may come from a no-grad or inference-mode forward (generation).
        with torch.inference_mode(False), torch.enable_grad():
            case = self.probe(x, call)
            want = case.run(self._backends[TORCH].fn, [t.float() for t in case.inputs])
            timings, refused = {}, []
            for backend in candidates:
                try:
                    got = case.run(backend.fn, case.inputs)
                    err = max(rms_ratio(g, w) for g, w in zip(got, want))
                    if err >= tol:
                        refused.append(f"{backend.name} inexact (rms {err:.1e} >= {tol:g})")
                        continue
                    timings[backend.name] = median_ms(lambda b=backend: case.run(b.fn, case.inputs), x.device)
                except Exception as exc:  # a candidate that fails here is refused, with its error
                    refused.append(f"{backend.name} failed ({type(exc).__name__}: {str(exc)[:200]})")
            del want
        if not timings:
            raise BackendUnavailableError(
                f"{self.name}: no backend passed the exactness probe on {x.device}: {'; '.join(refused)}"
            )
        chosen = min(timings, key=timings.get)
        ranked = ", ".join(f"{n} {ms:.3g} ms" for n, ms in sorted(timings.items(), key=lambda kv: kv[1]))
        reason = f"fastest exact at {case.shape} fwd+bwd: {ranked}"
        if refused:
            reason += "; refused: " + "; ".join(refused)
        return chosen, reason, timings
