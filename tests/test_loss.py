"""model/loss.py against torch's own cross entropy on the full logits: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from model import Mixtral, model_config
from model.loss import fused_linear_cross_entropy


def reference(hidden, weight, labels, scale):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).flatten(0, -2), labels.flatten(), reduction="sum")
    (loss * scale).backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [7, 64, 0])  # uneven chunks, one chunk, the default
def test_matches_cross_entropy_fp32(chunk_rows):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 16, generator=gen).requires_grad_()
    weight = (torch.randn(50, 16, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, 50, (3, 21), generator=gen)
    labels[0, :5] = -100  # ignored rows: no loss, no gradient
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    (loss * 0.37).backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, 0.37)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), ref_w, rtol=1e-5, atol=1e-7)
    assert hidden.grad[0, :5].abs().max() == 0


def test_bf16_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(64, 32, generator=gen) * 0.2).bfloat16().requires_grad_()
    labels = torch.randint(0, 64, (40,), generator=gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, labels, 1.0)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hidden.grad.double(), ref_h, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(weight.grad.double(), ref_w, rtol=3e-2, atol=3e-3)


def test_all_ignored_and_shape_errors():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_cross_entropy(hidden, weight, torch.zeros(5, dtype=torch.long))


def test_model_hidden_then_output_is_forward():
    model = Mixtral(model_config("debug", vocab_size=300))
    model.init_weights(0)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([list(range(5)) + list(range(7))] * 2)
    logits, stats = model(tokens, positions)
    h, stats_h = model.hidden(tokens, positions)
    torch.testing.assert_close(model.output(h), logits, rtol=0, atol=0)
    torch.testing.assert_close(stats_h.counts, stats.counts)
