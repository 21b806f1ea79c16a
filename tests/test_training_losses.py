"""LongCE windows and weights, L2Wrap, and the pipeline packing of v_first."""
import pytest
import torch

from megatron_rwkvx.training.losses import L2Wrap, longce_weights, longce_windows, masked_token_loss


def test_longce_windows_follow_the_reference():
    # Reference: windows of 8000 stepped by 4000, each scoring its last 4000 tokens; the first
    # 8000 positions are not scored.
    wins = longce_windows(64000, 8000, 4000)
    assert wins[0] == (4000, 8000, 12000)
    assert wins[-1][2] == 64000
    scored = torch.zeros(64000, dtype=torch.int)
    for start, frm, end in wins:
        assert end - start == 8000 and end - frm == 4000
        scored[frm:end] += 1
    assert scored[:8000].sum() == 0 and (scored[8000:] == 1).all()
    assert len(wins) == 14  # the reference's 14 forwards per 64K sequence
    # A length that does not fall on the stride: the last window ends at the sequence end.
    wins = longce_windows(10000, 8000, 4000)
    assert wins == [(2000, 8000, 10000)]


def test_longce_weights_cap_and_default():
    long = torch.tensor([[1.0, 1.0, 1.0]])
    short = torch.tensor([[1.0, 5.0, 0.0]])
    scored = torch.tensor([[True, True, False]])
    w = longce_weights(long, short, scored, tau=10.0)
    assert torch.allclose(w, torch.tensor([[1.0, 10.0, 1.0]]))
    long.requires_grad_(True)
    assert not longce_weights(long, short, scored, 5.0).requires_grad


def test_masked_token_loss_is_a_sum_with_count():
    losses = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 1]])
    s, n, report = masked_token_loss(losses, mask)
    assert s.item() == 4.0 and n.item() == 2
    assert torch.equal(report["lm loss"], torch.tensor([4.0, 2.0]))
    s, n, _ = masked_token_loss(losses, mask, weights=torch.tensor([[2.0, 1.0, 0.5]]))
    assert s.item() == 3.5


def test_l2wrap_adds_gradient_to_the_max_logit_only():
    logits = torch.tensor([[[0.5, 3.0, -1.0]]], requires_grad=True)
    out = L2Wrap.apply(logits, 1e-4, None)
    assert torch.equal(out, logits)
    out.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[[1.0, 1.0 + 3e-4, 1.0]]]))


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True), (4, True)])
def test_pipeline_packing_roundtrip(tp, sp):
    from types import SimpleNamespace

    from megatron_rwkvx.models.stage_payload import StagePayload

    cfg = SimpleNamespace(pipeline_model_parallel_size=2, tensor_model_parallel_size=tp,
                          sequence_parallel=sp)
    s, b, c = 16, 2, 8
    s_h = s // tp if sp else s
    hidden = torch.randn(s_h, b, c)
    v_first = torch.randn(s, b, c // tp)
    packed = StagePayload(hidden, v_first).pack(cfg)
    # The schedule's p2p shape: seq_length / (tp if sp) rows.
    rows = StagePayload.schedule_seq_length(cfg, s) // (tp if sp else 1)
    assert packed.shape == (rows, b, c)
    received = StagePayload.unpack(packed, cfg)
    h2, v2 = received.hidden, received.v_first
    assert torch.equal(h2, hidden) and torch.equal(v2, v_first)
