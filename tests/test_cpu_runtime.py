"""The CPU runtime shim redirects exactly megatron-core's CUDA assumptions, and undoes them."""
import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_redirections_and_disable():
    out = _run(
        """
        import torch
        from megatron_rwkvx import cpu_runtime
        cpu_runtime.enable(); cpu_runtime.enable()  # idempotent
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.synchronize()
        t = torch.zeros(3, device="cuda"); assert t.device.type == "cpu"
        t = torch.empty(2, device=torch.cuda.current_device()); assert t.device.type == "cpu"
        t = torch.ones(2).cuda(); assert t.device.type == "cpu"
        assert t.to("cuda").device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        # The model-parallel RNG tracker forks the CPU stream and restores it.
        from megatron.core.tensor_parallel import random as r
        r.initialize_rng_tracker(force_reset=True)
        tracker = r.get_cuda_rng_tracker()
        torch.manual_seed(0)
        tracker.add("model-parallel-rng", 123)
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(3)
        assert torch.equal(before, torch.get_rng_state())
        torch.manual_seed(123); assert torch.equal(a, torch.rand(3))
        cpu_runtime.disable()
        assert torch.ones(1).type() == "torch.FloatTensor"
        try:
            torch.zeros(1, device="cuda")
        except (RuntimeError, AssertionError, AttributeError) as e:
            print("restored")
        """
    )
    assert "restored" in out
