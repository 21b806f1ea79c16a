"""The configurations the trainer check runs, most valuable first, and each one's trainer arguments.

On a GPU: the 0.2B RWKV-X of the paper (``RRRA`` x 4, C = 768, chunk 2048, top-k 3, vocabulary
65,536) at 16K and 64K, sparse and dense, without recompute, then with full and selective
recompute, then a wider model (``--wide-width``, same pattern and depth; full recompute beyond
the shortest length) if the budget allows.
``--smoke``: the same code paths with a tiny model on the CPU in fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List

from megatron_rwkvx.config import DENSE_MODE, SPARSE_MODE
from megatron_rwkvx.models.recompute import MODE_FLAGS

PAPER_PATTERN = "RRRA" * 4  # 12 RWKV-7 + 4 sparse blocks (DESIGN.md: the 0.22B reference)


@dataclass(frozen=True)
class Shape:
    """The model: ``name`` labels it in the table; ``vocab`` is its embedding rows."""

    name: str
    width: int
    pattern: str
    head_size: int = 64
    chunk: int = 2048
    top_k: int = 3
    vocab: int = 65536

    def argv(self) -> List[str]:
        return ["--layer-pattern", self.pattern, "--hidden-size", str(self.width),
                "--head-size", str(self.head_size), "--sparse-chunk-size", str(self.chunk),
                "--sparse-top-k", str(self.top_k)]


@dataclass(frozen=True)
class Case:
    """One timed configuration: a model, a length, what the A blocks compute, a recompute mode."""

    shape: Shape
    seq_length: int
    attention: str = SPARSE_MODE
    recompute: str = "none"

    @property
    def name(self) -> str:
        return f"{self.shape.name} T={self.seq_length} {self.attention} recompute={self.recompute}"

    def record(self) -> dict:
        return dict(model=self.shape.name, width=self.shape.width, pattern=self.shape.pattern,
                    T=self.seq_length, attention=self.attention, recompute=self.recompute)


@dataclass(frozen=True)
class Device:
    """Where and how the timed runs train: device, precision flag and the operators' backends."""

    device: str
    precision: List[str] = field(default_factory=list)
    backends: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)  # for the configuration's process


GPU = Device("cuda", ["--bf16"], ["--wkv-backend", "triton", "--sparse-attention-backend", "triton"])
# A CPU run on the GPU machine sees no GPU, as on a machine without one (the CPU runtime shim
# redirects torch.cuda; nothing else may then reach the real device).
CPU = Device("cpu", [], ["--wkv-backend", "torch", "--sparse-attention-backend", "torch"],
             {"CUDA_VISIBLE_DEVICES": ""})
# The smoke mode's stand-in for the GPU side of the loss check: bf16 training on the CPU.
CPU_BF16 = Device("cpu", ["--bf16"], CPU.backends, CPU.env)


def pretrain_argv(shape: Shape, seq_length: int, device: Device, steps: int, seed: int,
                  extra: List[str] = (), with_shape: bool = True) -> List[str]:
    """``python -m megatron_rwkvx.pretrain`` arguments: mock data (megatron-core's MockGPTDataset,
    the same batches for the same seed), batch 1, no evaluation, no saves. The NullTokenizer adds
    an end-of-document id to its --vocab-size (Megatron-LM), so it is given one row less."""
    return ["--device", device.device, *device.precision, *device.backends,
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(shape.vocab - 1),
            "--seq-length", str(seq_length), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", str(steps), "--eval-iters", "0", "--split", "100,0,0",
            "--log-interval", str(steps), "--seed", str(seed),
            *(shape.argv() if with_shape else []), *extra]


def case_argv(case: Case, device: Device, steps: int, seed: int, lr: float, extra: List[str] = ()) -> List[str]:
    return pretrain_argv(case.shape, case.seq_length, device, steps, seed,
                         ["--lr", str(lr), "--attention-mode", case.attention,
                          *MODE_FLAGS[case.recompute], *extra])


def timed_cases(lengths: List[int], wide_width: int, smoke: bool) -> List[Case]:
    """The timed configurations, in the order they run (the budget cuts the tail)."""
    if smoke:
        tiny = Shape("tiny", 32, "RRA", head_size=16, chunk=16, top_k=2, vocab=256)
        T = lengths[0]
        return [Case(tiny, T), Case(tiny, T, DENSE_MODE), Case(tiny, T, recompute="full"),
                Case(tiny, T, recompute="selective")]
    base = Shape("0.2B", 768, PAPER_PATTERN)
    cases = []
    for T in lengths:  # the comparison first: sparse and dense of the same size, no recompute
        cases += [Case(base, T), Case(base, T, DENSE_MODE)]
    longest = max(lengths)
    cases += [Case(base, longest, recompute=mode) for mode in ("full", "selective")]
    cases += [Case(base, T, recompute=mode) for T in lengths if T != longest for mode in ("full", "selective")]
    if wide_width:
        # Beyond the shortest length with full recompute: the planner puts C=2048 at 64K without
        # it at ~190 GiB, with it at ~66 GiB (one H200: 141 GiB).
        wide = Shape(f"C={wide_width}", wide_width, PAPER_PATTERN)
        for T in lengths:
            mode = "none" if T == min(lengths) else "full"
            cases += [Case(wide, T, recompute=mode), Case(wide, T, DENSE_MODE, mode)]
    return cases


def loss_check_shape(smoke: bool) -> Shape:
    """Small enough that its fp32 CPU reference takes seconds; T > chunk x top_k, so the chunk
    selection is part of what is compared."""
    if smoke:
        return Shape("tiny", 32, "RRA", head_size=16, chunk=16, top_k=2, vocab=256)
    return Shape("loss check", 256, "RRRA" * 2, chunk=256, top_k=3, vocab=4096)


def as_dict(shape: Shape) -> dict:
    return asdict(shape)
