"""The loss over the vocabulary, computed a chunk of rows at a time (model.vocab_cross_entropy), is the plain
F.cross_entropy on the whole float32 logits: the same loss and gradients, for the trunk and the MTP heads."""
import pytest
import torch
import torch.nn.functional as F

import model as M
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def plain(x, weight, targets):
    return F.cross_entropy(F.linear(x, weight).flatten(0, -2).float(), targets.flatten(), ignore_index=-1)


def loss_and_grads(loss_fn, x, weight, targets, dtype=None):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn(x, weight, targets)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def problem(rows=2 * 37 + 5):
    """Rows that make several uneven chunks, some targets ignored, logits wide enough to matter."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, 24, generator=g), torch.randn(301, 24, generator=g)
    targets = torch.randint(0, 301, (rows,), generator=g)
    targets[::5] = -1
    return x, weight, targets


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setitem(M.CE_CHUNK_BYTES, "cpu", 4 * 301 * 37)  # 37 rows of the 301-wide logits per chunk


def test_chunked_loss_and_gradients_equal_the_plain_ones_in_float32(small_chunks):
    x, weight, targets = problem()
    for ours, theirs in zip(loss_and_grads(M.vocab_cross_entropy, x, weight, targets),
                            loss_and_grads(plain, x, weight, targets)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_under_bf16_autocast_chunked_is_as_close_to_the_exact_loss_and_gradients_as_plain_is(small_chunks):
    x, weight, targets = problem()
    exact = loss_and_grads(plain, x.double(), weight.double(), targets)
    ours = loss_and_grads(M.vocab_cross_entropy, x, weight, targets, torch.bfloat16)
    theirs = loss_and_grads(plain, x, weight, targets, torch.bfloat16)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=0)  # the same bf16 logits, float32 softmax
    for o, t, e in zip(ours, theirs, exact):
        assert (o.double() - e).abs().max() <= 2 * (t.double() - e).abs().max() + 1e-6


def test_a_training_step_with_mtp_heads_and_ignored_targets_gets_the_plain_losses_and_gradients(small_chunks,
                                                                                                   monkeypatch):
    cfg = ModelConfig(vocab_size=301, block_size=16, n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, mtp_depth=2,
                      tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    idx = torch.randint(0, 301, (3, 16))
    targets = idx.roll(-1, 1)
    targets[:, -1], targets[1, :4] = -1, -1

    def step():
        model.zero_grad()
        logits, loss, parts, _ = model(idx, targets)
        loss.backward()
        return logits, loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters()}
    logits, loss, parts, grads = step()
    monkeypatch.setattr(M, "vocab_cross_entropy", plain)
    _, plain_loss, plain_parts, plain_grads = step()
    assert logits is None  # training reads only the loss: no [B, T, vocab] logits are made
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert parts["mtp"] > 0 and all(torch.allclose(parts[k], plain_parts[k], rtol=1e-6) for k in ("ce", "mtp"))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_evaluation_still_returns_the_logits_with_the_loss(small_chunks):
    cfg = ModelConfig(vocab_size=301, block_size=16, n_layer=1, n_embd=32, n_head=2, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 301, (2, 16))
    with torch.no_grad():
        logits, loss, _, _ = model(idx, idx)
        alone = model(idx).logits
    assert torch.equal(logits, alone)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx.flatten()), rtol=1e-5, atol=0)
