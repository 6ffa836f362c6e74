"""Pins the subtle parts of model.py: causality, the absorbed MLA cache, routing, balancing, MTP."""
import math

import pytest
import torch
import torch.nn.functional as F

import generate as G
import model as M
from generate import Sampling, generate
from conftest import rows_decode_as_alone, rows_slide_as_the_full_forward
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    base = dict(vocab_size=61, block_size=32, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_dense_layers=1)
    return ModelConfig(**{**base, **kw})


VARIANTS = {
    "mla-moe": dict(),
    "mla-dense": dict(n_routed_experts=0),
    "gqa-moe": dict(attn="gqa", n_kv_head=2),
    "gqa-dense": dict(attn="gqa", n_kv_head=2, n_routed_experts=0),
    "mla-qlora-groups-mtp": dict(q_lora_rank=24, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, mtp_depth=1),
}


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_changing_a_later_token_never_changes_earlier_logits(kw):
    torch.manual_seed(0)
    model = Transformer(tiny(**kw)).eval()
    x = torch.randint(0, 61, (2, 24))
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 61
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_decoding_gives_the_logits_of_the_full_forward(kw):
    # for MLA the cached path is the absorbed form: only c_KV and k_R are stored
    torch.manual_seed(0)
    model = Transformer(tiny(**kw)).eval()
    x = torch.randint(0, 61, (2, 20))
    full = model(x)[0]
    model.setup_cache(2, 32)
    steps = [model(x[:, :8], start_pos=0)[0]] + [model(x[:, t:t + 1], start_pos=t)[0] for t in range(8, 20)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_rows_at_their_own_positions_decode_as_each_sequence_alone(kw):
    # continuous batching: sequences of different lengths share one forward per step, each in its own cache
    # row at its own position; rows hold a longer earlier sequence, which must stay out of sight
    torch.manual_seed(0)
    model = Transformer(tiny(**kw)).eval()
    rows_decode_as_alone(model, 61, [3, 11, 6], torch.tensor([4, 0, 2]), 5, 32, 20)


@pytest.mark.parametrize("kw", [VARIANTS["mla-moe"], VARIANTS["gqa-dense"]], ids=["mla-moe", "gqa-dense"])
@torch.no_grad()
def test_padding_past_a_rows_positions_never_reaches_its_queries(kw):
    # ragged rows decode together right-padded to the longest (the engine's speculative steps): a row's padding
    # goes into its cache at positions past its real ones, which its next forward, starting at its first free
    # position, overwrites before any of its queries can see them (write_cache writes before attending,
    # causal_mask hides what lies past each query): the real tokens get the logits of the full forward
    torch.manual_seed(0)
    model = Transformer(tiny(**kw)).eval()
    x, g = torch.randint(0, 61, (2, 20)), torch.Generator().manual_seed(1)
    full = model(x)[0]
    model.setup_cache(2, 32)
    out = [[o] for o in model(x[:, :4], start_pos=torch.tensor([0, 0]))[0].split(1)]
    pos = [4, 4]
    while min(pos) < 20:
        n = [min(int(torch.randint(1, 4, (), generator=g)), 20 - p) for p in pos]  # 1-3 real tokens, or none
        idx = torch.randint(0, 61, (2, 3), generator=g)  # the padding
        for b in range(2):
            idx[b, :n[b]] = x[b, pos[b]:pos[b] + n[b]]
        logits = model(idx, start_pos=torch.tensor(pos))[0]
        for b in range(2):
            out[b].append(logits[b:b + 1, :n[b]])
            pos[b] += n[b]
    assert torch.allclose(torch.cat([torch.cat(o, 1) for o in out]), full, atol=1e-5)


@pytest.mark.parametrize("kw", [VARIANTS["mla-moe"], VARIANTS["gqa-dense"]], ids=["mla-moe", "gqa-dense"])
@torch.no_grad()
def test_decoding_past_the_context_gives_the_logits_of_the_banded_forward_over_the_whole_sequence(kw):
    # the caches are rolling windows of block_size + 1 slots: positions count on past the 8-token context and a
    # query sees the 8 positions up to its own. That is the forward over all 40 tokens with each seeing itself
    # and the 7 before it (forward past block_size), not the re-encoding of the last 8 from position 0: with 3
    # layers older tokens still reach the last one through the kept tokens' deeper states. Rows decode at their
    # own offsets in cache rows that held other sequences, in ragged right-padded steps that wrap the ring
    torch.manual_seed(0)
    model = Transformer(tiny(block_size=8, **kw)).eval()
    x = torch.randint(0, 61, (3, 40))
    full = model(x).logits
    assert not torch.allclose(full[:, -1], model(x[:, -8:]).logits[:, -1], atol=1e-3)  # re-encoding differs
    rows_slide_as_the_full_forward(model, x, full, torch.tensor([3, 0, 2]), [2, 8, 5], 1e-5)


@torch.no_grad()
def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).eval()
    x = torch.randint(0, 61, (1, 6))
    model.setup_cache(1, cfg.block_size)
    model(x, start_pos=0)
    attn = model.layers[0].attn
    c_kv, k_pe = attn.wkv_a(model.layers[0].attn_norm(model.embed(x))).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
    k_pe = M.apply_rope(k_pe[:, :, None], model.cos[:6], model.sin[:6])[:, :, 0]
    # two tensors per layer, the latent and the rope key, filled for the 6 positions seen and nothing else
    assert [tuple(t.shape) for t in attn.cache] == [(1, cfg.block_size, cfg.kv_lora_rank),
                                                     (1, cfg.block_size, cfg.qk_rope_head_dim)]
    assert torch.allclose(attn.cache[0][:, :6], attn.kv_norm(c_kv), atol=1e-6)
    assert torch.allclose(attn.cache[1][:, :6], k_pe, atol=1e-6)
    assert not attn.cache[0][:, 6:].any() and not attn.cache[1][:, 6:].any()
    model.setup_cache(0, 0)


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_greedy_generation_with_cache_equals_recomputing_the_prefix(attn):
    torch.manual_seed(0)
    model = Transformer(tiny(attn=attn, n_kv_head=2)).eval()
    with torch.no_grad():  # a sharper head, so that no two logits tie by rounding
        model.head.weight.mul_(30)
    x = torch.randint(0, 61, (1, 5))
    # 50 new tokens run past the 32-token context, so the sliding window is exercised too
    cached = generate(model, x, 20, temperature=0, use_cache=True)
    plain = generate(model, x, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    long = generate(model, x, 50, temperature=0, use_cache=True)
    assert long.shape == (1, 55) and torch.equal(long[:, :25], cached)


def test_generation_with_a_seed_is_reproducible_and_top_k_one_is_greedy():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 61, (2, 4))
    torch.manual_seed(1)
    a = generate(model, x, 10, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(1)
    b = generate(model, x, 10, temperature=1.0, top_k=10, top_p=0.9)
    assert torch.equal(a, b)
    assert torch.equal(generate(model, x, 10, top_k=1), generate(model, x, 10, temperature=0))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {G.sample(logits, Sampling(top_p=0.7)).item() for _ in range(200)}
    assert picks == {0, 1}


def routed(**kw):
    torch.manual_seed(0)
    cfg = tiny(**kw)
    moe = M.MoE(cfg)
    for p in moe.parameters():  # Transformer initialises these; a bare MoE is left empty
        torch.nn.init.normal_(p, std=0.1 if p is moe.gate.weight else 0.02)
    return cfg, moe


def test_router_picks_exactly_k_distinct_experts_with_weights_summing_to_route_scale():
    cfg, moe = routed(n_routed_experts=8, n_activated_experts=3, route_scale=2.5)
    weights, indices, _ = moe.gate(torch.randn(100, cfg.n_embd))
    assert indices.shape == (100, 3)
    assert all(len(set(row)) == 3 for row in indices.tolist())
    assert torch.allclose(weights.sum(-1), torch.full((100,), 2.5), atol=1e-5)


GROUP_RULES = {  # a group's score: the sum of its two best (V3, sigmoid), its best (V2, softmax)
    "sigmoid": lambda groups: groups.topk(2, -1)[0].sum(-1),
    "softmax": lambda groups: groups.amax(-1),
}


@pytest.mark.parametrize("score_func", GROUP_RULES)
def test_group_limited_routing_takes_experts_only_from_the_groups_its_paper_chooses(score_func):
    cfg, moe = routed(n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                      score_func=score_func)
    moe.gate.bias.copy_(torch.randn(16) * 0.01)
    x = torch.randn(200, cfg.n_embd)
    _, indices, scores = moe.gate(x)
    groups = (scores + moe.gate.bias).view(200, 4, 4)
    best = {f: rule(groups).topk(2, -1)[1].sort(-1)[0] for f, rule in GROUP_RULES.items()}
    for row, chosen in zip(indices.tolist(), best[score_func].tolist()):
        assert {e // 4 for e in row} <= set(chosen)
    assert (best["sigmoid"] != best["softmax"]).any(-1).float().mean() > 0.05  # the rules differ: the test can fail


def test_bias_changes_selection_but_not_the_weights_of_chosen_experts():
    cfg, moe = routed(n_routed_experts=8, n_activated_experts=2)
    x = torch.randn(50, cfg.n_embd)
    moe.gate.bias[3] = 10.0  # expert 3 is now always chosen
    weights, indices, scores = moe.gate(x)
    assert (indices == 3).any(-1).all()
    chosen = scores.gather(1, indices)
    assert torch.allclose(weights, chosen / chosen.sum(-1, keepdim=True))


def test_bias_update_moves_a_skewed_router_toward_uniform_load():
    torch.manual_seed(0)
    cfg = tiny(n_routed_experts=8, n_activated_experts=2, bias_update_speed=0.01, n_layer=2)
    model = Transformer(cfg).train()
    moe = model.moes[0]
    with torch.no_grad():
        moe.gate.weight[:2] += 0.3  # experts 0 and 1 attract most tokens
    x = torch.randn(1, 256, cfg.n_embd)

    def imbalance():
        moe(x)
        return (moe.load.max() / moe.load.mean()).item()

    before = imbalance()
    for _ in range(100):
        model.moe_load.zero_()
        moe(x)
        model.update_bias(moe.load[None])
    assert before > 1.8 and imbalance() < 1.3
    assert model.moe_load.sum() == 0  # update_bias resets the counters


def test_sequence_wise_balance_loss_equals_its_formula_on_a_hand_made_case():
    _, moe = routed(n_routed_experts=4, n_activated_experts=1, seq_aux_alpha=0.5)
    scores = torch.tensor([[[0.8, 0.2, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4]]])  # one sequence, T=2
    indices = torch.tensor([[[0], [2]]])
    # f = E/(K T) * counts = 4/2 * [1, 0, 1, 0]; P = mean of normalised scores = [0.45, 0.15, 0.2, 0.2]
    expected = 0.5 * (2 * 0.45 + 2 * 0.2)
    assert math.isclose(moe.balance_loss(scores, indices).item(), expected, rel_tol=1e-6)


def test_capacity_factor_drops_the_lowest_affinity_tokens_of_an_overloaded_expert():
    cfg, moe = routed(n_routed_experts=4, n_activated_experts=1, capacity_factor=1.0, n_shared_experts=0)
    moe.train()
    x = torch.randn(1, 8, cfg.n_embd)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 1.0  # all tokens prefer expert 0, affinity rising with x[..., 0]
        moe.gate.bias.copy_(torch.tensor([0.0, -1, -1, -1]))
        x[0, :, 0] = torch.arange(8.0)
    out = moe(x)
    # capacity = 1.0 * 8 tokens * 1 / 4 experts = 2: tokens 6 and 7 are kept, six pairs dropped
    assert moe.dropped.item() == 6
    assert (out[0, :6] == 0).all() and (out[0, 6:] != 0).any(-1).all()
    moe.eval()  # inference keeps every token
    assert (moe(x)[0] != 0).any(-1).all()


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_matmul_and_the_per_expert_loop_agree():
    torch.manual_seed(0)
    experts = M.Experts(4, 16, 32)
    for w in experts.parameters():
        torch.nn.init.normal_(w)
    x, counts = torch.randn(20, 16, requires_grad=True), torch.tensor([5, 0, 9, 6])
    out = {}
    for impl in ("grouped_mm", "loop"):
        experts.impl = impl
        y = experts(x, counts)
        out[impl] = (y, *torch.autograd.grad(y.square().sum(), [x, experts.w1]))
    assert all(torch.allclose(u, v, atol=1e-3) for u, v in zip(out["grouped_mm"], out["loop"]))


def test_mtp_loss_is_finite_and_its_gradient_reaches_the_shared_head_and_embedding():
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=2, mtp_lambda=0.5)).train()
    x = torch.randint(0, 61, (2, 16))
    shared = [model.head.weight, model.embed.weight]

    def grads(mtp_lambda):
        model.cfg.mtp_lambda = mtp_lambda
        out = model(x[:, :-1], x[:, 1:])
        return out, torch.autograd.grad(out.loss, shared + list(model.mtp.parameters()), allow_unused=True)

    (_, loss, parts, _), g_full = grads(0.5)
    assert torch.isfinite(parts["mtp"]) and parts["mtp"] > 0
    assert torch.allclose(loss, parts["ce"] + 0.5 * parts["mtp"] + parts["aux"])
    _, g_main = grads(0.0)
    # the MTP term's own gradient (full minus main) is nonzero on the shared head and embedding
    assert all((a - b).abs().sum() > 0 for a, b in zip(g_full[:2], g_main[:2]))
    assert all(g is not None and g.abs().sum() > 0 for g in g_full[2:])


def test_activation_checkpointing_gives_the_same_loss_gradients_and_expert_counts():
    torch.manual_seed(0)
    cfg = tiny(seq_aux_alpha=0.01)
    a = Transformer(cfg).train()
    b = Transformer(tiny(seq_aux_alpha=0.01, grad_checkpoint=True)).train()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 61, (2, 17))
    for m in (a, b):
        m(x[:, :-1], x[:, 1:])[1].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    assert torch.equal(a.moe_counts()[0], b.moe_counts()[0])
    assert a.moe_counts()[0].sum() == 2 * 16 * cfg.n_activated_experts * len(a.moe_layer_ids)


def test_a_compiled_model_trains_with_the_eager_models_loss_and_gradients():
    # train.py --compile=True and bench.py's mfu section: the compiled loss once came out without a grad_fn
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS["gqa-dense"])).train()
    x = torch.randint(0, 61, (2, 17))
    grads = []
    for m in (torch.compile(model), model):
        loss = m(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (compiled, got), (eager, want) = grads
    assert compiled == pytest.approx(eager, abs=1e-5)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_a_tiny_moe_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layer=2, mtp_depth=1, seq_aux_alpha=0.001)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 61, (4, 33))
    for step in range(300):
        _, loss, parts, _ = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_bias(model.moe_counts()[0])
        if parts["ce"] < 0.1:
            break
    assert parts["ce"] < 0.1, f"ce {parts['ce']:.3f} after {step + 1} steps"


def test_smollm2_135m_has_its_published_parameter_count():
    cfg = ModelConfig(attn="gqa", n_layer=30, n_embd=576, n_head=9, n_kv_head=3, inter_dim=1536,
                      vocab_size=49152, tie_embeddings=True, n_routed_experts=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == 134_515_008


def test_active_parameters_count_k_of_e_routed_experts():
    model = Transformer(tiny(n_routed_experts=8, n_activated_experts=2))
    per_layer = sum(p.numel() for p in model.moes[0].experts.parameters())
    assert model.num_params() - model.num_params(active=True) == len(model.moes) * per_layer * 6 // 8
    report = model.param_report()
    for kind in ("attention", "dense MLP", "routed experts", "shared experts", "router", "embeddings", "norms"):
        assert kind in report


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_flops_per_token_matches_the_matmuls_of_a_training_step(mtp_depth):
    # train.py's MFU rests on this formula. FlopCounterMode counts what forward and backward multiply; MLA's
    # unequal key and value widths send SDPA down its matmul path on CPU, so attention is counted too.
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_embd=64, n_head=4, kv_lora_rank=32, q_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, n_routed_experts=0,
                      mtp_depth=mtp_depth)
    model, x = Transformer(cfg), torch.randint(0, 256, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    assert counter.get_total_flops() / x.numel() == pytest.approx(model.flops_per_token(), rel=0.02)


def test_the_default_mla_cache_is_several_times_smaller_than_multi_head_attention():
    with torch.device("meta"):
        mla = Transformer(ModelConfig())
        mha = Transformer(ModelConfig(attn="gqa"))
    assert mha.cache_bytes_per_token() / mla.cache_bytes_per_token() >= 4


def test_yarn_stretches_only_the_low_frequencies_and_sharpens_attention():
    base = tiny(block_size=64, original_seq_len=64)
    yarn = tiny(block_size=256, original_seq_len=64, rope_factor=4.0)
    cos0, _ = M.precompute_rope(32, 64, base)
    cos1, _ = M.precompute_rope(32, 256, yarn)
    f0, f1 = torch.acos(cos0[1].clamp(-1, 1)), torch.acos(cos1[1].clamp(-1, 1))  # angle per position
    assert torch.allclose(f1[0], f0[0])  # the fastest pair turns as before
    assert torch.allclose(f1[-1], f0[-1] / 4, rtol=1e-3)  # the slowest is interpolated by the factor
    assert M.MLA(yarn).softmax_scale > M.MLA(base).softmax_scale


def test_a_checkpoint_dict_rebuilds_the_same_model():
    from dataclasses import asdict
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1)).eval()
    model.moes[0].gate.bias.fill_(0.25)
    ckpt = {"model_args": asdict(model.cfg), "model": model.state_dict()}
    again = Transformer(ModelConfig(**ckpt["model_args"])).eval()
    again.load_state_dict(ckpt["model"])
    x = torch.randint(0, 61, (1, 10))
    assert torch.equal(model(x)[0], again(x)[0]) and again.moes[0].gate.bias[0] == 0.25


def test_bf16_autocast_runs_the_moe_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 61, (2, 16))
    ref = model(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)[0]
    assert (low.float() - ref).abs().max() < 0.05


def weighted_sums(moe, x):
    """Each token of x [N, D] through the shared expert plus its chosen experts, weighted, one at a time."""
    weights, indices, _ = moe.gate(x)
    out = []
    for xt, wt, it in zip(x, weights, indices):
        y = moe.shared_experts(xt) if moe.shared_experts is not None else torch.zeros_like(xt)
        for w, e in zip(wt, it):
            gate, up = moe.experts.w1[e] @ xt, moe.experts.w3[e] @ xt
            y = y + w * M.swiglu(gate, up, moe.experts.limit) @ moe.experts.w2[e].T
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded"])
def test_moe_equals_each_tokens_weighted_sum_over_its_chosen_experts(impl):
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    cfg, moe = routed(n_routed_experts=8, n_activated_experts=2, route_scale=2.5)
    moe.train().experts.impl = impl
    x = torch.randn(2, 12, cfg.n_embd)
    params = [moe.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.shared_experts.w1.weight]
    out = moe(x.requires_grad_())
    got = (out, *torch.autograd.grad(out.square().sum(), [x] + params))
    ref = weighted_sums(moe, x.view(-1, cfg.n_embd)).view_as(out)  # one token at a time, expert by expert
    want = (ref, *torch.autograd.grad(ref.square().sum(), [x] + params))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


@pytest.mark.parametrize("shared, limit", [(1, 0.0), (0, 0.0), (2, 0.0), (1, 0.1)])
@pytest.mark.parametrize("tokens, path", [(1, "decode"), (2, "decode_dense"), (7, "decode_dense"),
                                          (M.DENSE_DECODE_TOKENS + 1, "experts")])
@torch.no_grad()
def test_a_decoding_moe_takes_the_cheapest_path_for_its_few_tokens_and_each_gives_the_weighted_sum(tokens, path,
                                                                                                  shared, limit,
                                                                                                  monkeypatch):
    # kept side by side while decoding on a CPU (setup_cache), the experts, shared ones (of any width) included,
    # run all on every token of a step whose pairs reach half of them (2 tokens x top-2 of 8), fewer pairs gather
    # their experts, a prefill sorts them: the same sums, V4's clamped SwiGLU (swiglu_limit) too
    cfg, moe = routed(n_routed_experts=8, n_activated_experts=2, n_shared_experts=shared, swiglu_limit=limit)
    moe.eval().keep_dense(torch.float32)
    taken = []
    for name in ("decode", "decode_dense"):
        monkeypatch.setattr(moe, name, lambda *a, f=getattr(moe, name), name=name: (taken.append(name), f(*a))[1])
    monkeypatch.setattr(moe.experts, "forward", lambda *a, f=moe.experts.forward: (taken.append("experts"), f(*a))[1])
    x = torch.randn(tokens, cfg.n_embd, generator=torch.Generator().manual_seed(tokens))
    out = moe(x[None])[0]
    assert taken == [path] and torch.allclose(out, weighted_sums(moe, x), rtol=1e-4, atol=1e-6)


def test_the_padded_batched_experts_agree_with_the_loop_and_pad_only_when_it_pays():
    torch.manual_seed(0)
    experts = M.Experts(4, 16, 32)
    for w in experts.parameters():
        torch.nn.init.normal_(w)
    x, counts = torch.randn(20, 16, requires_grad=True), torch.tensor([5, 0, 9, 6])  # an empty expert too
    out = {}
    for impl in ("padded", "loop"):
        experts.impl = impl
        y = experts(x, counts)
        out[impl] = (y, *torch.autograd.grad(y.square().sum(), [x, experts.w1, experts.w2, experts.w3]))
    assert all((u - v).abs().max() <= 1e-5 * v.abs().max() for u, v in zip(out["padded"], out["loop"]))
    bf16 = x.detach().bfloat16()
    assert experts.choose(bf16, counts) == "padded"  # 4 experts x 9 rows <= 2 x 20 rows
    assert experts.choose(bf16, torch.tensor([2, 0, 17, 2])) != "padded"  # 4 x 17 rows would be 3.4x the rows
    # a decoding step's few rows: padded to 16 rows an expert whatever the doubling (grouped_mm costs more there)
    assert experts.choose(bf16[:6], torch.tensor([0, 5, 1, 0])) == "padded"
    assert experts.choose(x, counts) != "padded"  # float32: the small products are efficient, padding is waste


# ----------------------------------------------------------------------------- speculative decoding with MTP
# tiny models decode fastest on one thread (tests/conftest.py); from here on the module runs on one
speculative = pytest.mark.usefixtures("one_thread")


def drafting_model(**kw):
    """A tiny model whose MTP modules draft well: their eh_proj passes the embedding of the token just chosen
    through, so that each guesses the trunk's next-token map from it, which the trunk's blocks sometimes
    override (drafts are kept and rejected). The head is scaled up so that no two logits tie by rounding: the
    verify forward over several tokens and the one-token steps then pick the same argmax."""
    torch.manual_seed(0)
    model = Transformer(tiny(**kw)).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)
        for m in model.mtp:
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :model.cfg.n_embd].copy_(torch.eye(model.cfg.n_embd))
    return model


def speculate(model, x, n, speculation=None, **sampling):
    return generate(model, x, n, speculative=True, speculation=speculation, **sampling)


SPECULATIVE = {
    "mla-moe": dict(mtp_depth=1),
    "mla-dense": dict(mtp_depth=1, n_routed_experts=0),
    "gqa-moe": dict(mtp_depth=1, attn="gqa", n_kv_head=2),
    "gqa-dense": dict(mtp_depth=1, attn="gqa", n_kv_head=2, n_routed_experts=0),
    "mla-moe-depth2": dict(mtp_depth=2),
}


@pytest.mark.parametrize("kw", SPECULATIVE.values(), ids=SPECULATIVE.keys())
@speculative
def test_speculative_greedy_decoding_yields_the_tokens_of_plain_greedy_decoding(kw):
    model = drafting_model(**kw)
    torch.manual_seed(1)
    speculation = {"drafted": 0, "accepted": 0}
    # prompts from 1 token to past the 32-token context; 70 new tokens slide the window two or three times
    for T, batch in [(1, 1), (8, 3), (24, 1), (31, 2), (40, 1)]:
        x = torch.randint(0, 61, (batch, T))
        assert torch.equal(speculate(model, x, 70, speculation, temperature=0),
                           generate(model, x, 70, temperature=0)), (T, batch)
    assert 0 < speculation["accepted"] < speculation["drafted"]  # both the kept and the rejected drafts' paths ran


@speculative
def test_speculative_decoding_stops_at_max_new_tokens_and_frees_the_caches():
    model = drafting_model(mtp_depth=2)
    x = torch.randint(0, 61, (1, 5))
    for n in (1, 2, 3, 7):
        assert speculate(model, x, n, temperature=0).shape == (1, 5 + n)
    assert all(layer.attn.cache is None for layer in [*model.layers, *(m.block for m in model.mtp)])


@speculative
def test_deep_drafts_after_a_one_token_prompt_that_are_all_rejected_start_the_mtp_caches_over():
    # with mtp_depth=3, the MTP caches' one position after a 1-token prompt read two drafts: when neither is
    # kept, no position is valid and drafting restarts at 0 (mtp_valid), not at -1 (which failed 7 in 20)
    model = drafting_model(mtp_depth=3)
    speculation = {"drafted": 0, "accepted": 0}
    for t in range(20):
        torch.manual_seed(t)
        assert speculate(model, torch.tensor([[t]]), 10, speculation, temperature=1.0).shape == (1, 11)
    assert 0 < speculation["accepted"] < speculation["drafted"]


def uncached_drafts(model, window, drafts, sampling):
    """What the drafts after window [1, T + 1] (its last token the pending one) are drawn from, by the MTP modules
    run without a cache over every position of it: [len(drafts), V] probabilities. Module k reads the trunk's
    states (module k-1's) and the tokens k ahead, the drafts after the window; a draft past the modules comes from
    the last one over one position more, whose input there is its own output state at the position before."""
    T = window.size(1) - 1
    model.setup_cache(1, T)
    h, tokens = model(window[:, :-1], start_pos=0).hidden, torch.cat([window, drafts], 1)
    probs = []
    for k in range(drafts.size(1)):
        depth = min(k, model.cfg.mtp_depth - 1)
        n = T + k - depth  # positions: the window's, and one more per chained draft
        if k > depth:  # chained: the module's last output state stands in for the trunk's
            h = torch.cat([inputs, out_states[:, -1:]], 1)
        inputs = h
        out_states, out = model.mtp[depth](h, model.embed(tokens[:, depth + 1:depth + 1 + n]), *model.rope(0, n))
        h = out_states
        probs.append(G.probabilities(model.head(out[:, -1]).float(), sampling))
    model.setup_cache(0)
    return torch.cat(probs)


@pytest.mark.parametrize("depth, drafts", [(2, None), (1, 3), (2, 4)], ids=["modules", "chained", "both"])
@speculative
def test_mtp_drafts_come_from_the_modules_run_over_the_whole_window(monkeypatch, depth, drafts):
    # the MTP modules' own caches stay in step with the trunk's: each draft is drawn from what the modules
    # predict when they run without a cache over every position of the window (the trunk's states from a
    # prefill), also after rejected drafts (a depth-2 cache entry reads the first draft), after the window
    # slid past the 32-token context (66 tokens: the reference is the banded forward over all of them), and for
    # drafts past the modules, the last one chained on its own output (its guessed entries never kept)
    model = drafting_model(mtp_depth=depth)
    with torch.no_grad():  # the modules read the states they are given too (a chained draft's, its module's own)
        for m in model.mtp:
            m.eh_proj.weight[:, model.cfg.n_embd:].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    calls, draft, speculation = [], G.Decoder.draft, {"drafted": 0, "accepted": 0}

    def spy(decoder, rows):
        draft(decoder, rows)
        state = decoder.rows[rows[0]]  # window: its tokens from position 0 to the pending one
        calls.append((torch.tensor([state.tokens]), torch.tensor([state.drafts]), state.q))

    monkeypatch.setattr(G.Decoder, "draft", spy)
    monkeypatch.setattr(G.Drafting, "drafts", lambda policy, batch: True)  # every step, whatever the timings
    torch.manual_seed(0)
    speculate(model, torch.randint(0, 61, (1, 6)), 60, speculation, temperature=1.0, drafts=drafts)
    assert len(calls) > 10 and 0 < speculation["accepted"] < speculation["drafted"]
    assert speculation["drafted"] % (drafts or depth) == 0 and all(d.size(1) == (drafts or 2) for _, d, _ in calls)
    for window, drafts, q in calls:
        assert torch.allclose(uncached_drafts(model, window, drafts, Sampling()), q, atol=1e-5)


@speculative
def test_drafts_from_a_draft_vocabulary_are_among_it_and_greedy_text_stays_plain_text(monkeypatch):
    # FR-Spec's drafts score only draft_ids (here the even tokens), and verification by the full head keeps the
    # text plain greedy's: the odd tokens it writes were drafted by no one
    model = drafting_model(mtp_depth=2)
    model.draft_ids = torch.arange(0, 61, 2)
    drafted, draft = [], G.Decoder.draft
    monkeypatch.setattr(G.Decoder, "draft", lambda d, rows: (draft(d, rows), drafted.extend(
        t for r in rows for t in d.rows[r].drafts)))
    speculation = {"drafted": 0, "accepted": 0}
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    out = speculate(model, x, 60, speculation, temperature=0)
    assert torch.equal(out, generate(model, x, 60, temperature=0))
    assert drafted and all(t % 2 == 0 for t in drafted) and (out[:, 9:] % 2).sum() > 10
    assert 0 < speculation["accepted"] < speculation["drafted"]


def total_variation(samples, exact):
    """TV distance between the empirical distribution of samples [N] (outcome ids) and exact [K]."""
    counts = torch.bincount(samples, minlength=exact.numel()).double()
    return 0.5 * (counts / samples.numel() - exact).abs().sum().item()


def tv_bound(support, n):
    """A TV distance that n draws from a distribution on `support` outcomes exceed with probability below 1e-9,
    whatever the seed: E[TV] <= sqrt(support / n) / 2, and TV moves by at most 1/n per draw (McDiarmid)."""
    return 0.5 * math.sqrt(support / n) + math.sqrt(math.log(1e9) / (2 * n))


def test_speculative_accept_draws_each_token_as_the_model_would():
    # a toy model on 4 tokens: p(next | previous token) and a poor draft q(next | previous); one call of the
    # rule on 200k rows, each then completed to 3 tokens by plain draws from p, must draw 3-token sequences
    # with probability p(a) p(b|a) p(c|b): the kept drafts, the residual draw and the draw after 2 kept drafts
    g = torch.Generator().manual_seed(0)
    V, N = 4, 200_000
    p_next, q_next = (torch.rand(V, V, generator=g) ** 3 for _ in range(2))
    p_next, q_next = p_next / p_next.sum(-1, keepdim=True), q_next / q_next.sum(-1, keepdim=True)
    first = torch.tensor([0.1, 0.2, 0.3, 0.4])  # p after the pending token, which is token 0
    torch.manual_seed(0)
    d1 = torch.multinomial(q_next[torch.zeros(N, dtype=torch.long)], 1)[:, 0]
    d2 = torch.multinomial(q_next[d1], 1)[:, 0]
    p = torch.stack([first.expand(N, V), p_next[d1], p_next[d2]], 1)
    q = torch.stack([q_next[torch.zeros(N, dtype=torch.long)], q_next[d1]], 1)
    tokens, kept = G.speculative_accept(p, q, torch.stack([d1, d2], 1))
    assert set(kept.tolist()) == {0, 1, 2}
    for i in (1, 2):  # where a row stopped, plain draws from p continue it
        more = torch.multinomial(p_next[tokens[:, i - 1]], 1)[:, 0]
        tokens[:, i] = torch.where(kept >= i, tokens[:, i], more)
    exact = (first[:, None, None] * p_next[:, :, None] * p_next[None]).flatten()
    assert total_variation(tokens[:, 0] * 16 + tokens[:, 1] * 4 + tokens[:, 2], exact) < tv_bound(64, N)


def five_token_model():
    """A tiny model of 5 tokens with one MTP module, whose distributions are far from uniform and far from the
    MTP module's: small enough to enumerate what sampling a few tokens from it gives (continuations)."""
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=5, block_size=16, n_layer=1, n_embd=32, n_head=2, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, mtp_depth=1)).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)
    return model


def continuations(model, x, n, **sampling):
    """The probability that plain sampling (no cache) continues x [1, T] with each n tokens t1..tn: [5**n],
    indexed by outcome(t1..tn)."""
    exact, seqs = torch.ones(1, dtype=torch.float64), x
    with torch.no_grad():
        for _ in range(n):
            p = G.probabilities(model(seqs)[0][:, -1].double(), Sampling(**sampling))
            exact = (exact[:, None] * p).flatten()
            seqs = torch.cat([seqs.repeat_interleave(5, 0), torch.arange(5).repeat(seqs.size(0))[:, None]], 1)
    return exact


def outcome(tokens):
    """Continuations of the 5-token model [N, n] -> their indices into continuations() [N]: base-5 numbers."""
    return sum(tokens[:, i] * 5 ** (tokens.size(1) - 1 - i) for i in range(tokens.size(1)))


@pytest.mark.parametrize("draft_ids", [None, [0, 2, 3]], ids=["whole-vocabulary", "draft-vocabulary"])
@speculative
def test_speculative_sampling_draws_from_the_distribution_of_plain_sampling(draft_ids):
    # a 5-token model: enumerate p(t1, t2, t3 | prompt) under temperature 0.8, top-k 4 and top-p 0.95 (plain
    # sampling, no cache), then draw 8000 speculative continuations at once, one per row of a batch; drafts from
    # 3 of the 5 tokens (FR-Spec) miss more often, and the residual draws give the same distribution
    model = five_token_model()
    model.draft_ids = None if draft_ids is None else torch.tensor(draft_ids)
    sampling = dict(temperature=0.8, top_k=4, top_p=0.95)
    x, N = torch.tensor([[1, 3, 0, 2]]), 8000
    exact = continuations(model, x, 3, **sampling)
    torch.manual_seed(1)
    speculation = {"drafted": 0, "accepted": 0}
    out = outcome(speculate(model, x.expand(N, -1), 3, speculation, **sampling)[:, -3:])
    assert 0 < speculation["accepted"] < speculation["drafted"]
    assert exact[out].min() > 0  # nothing outside top-k and top-p
    assert total_variation(out, exact) < tv_bound(int((exact > 0).sum()), N)


def test_mtp_acc_and_agree_count_depth_ones_guesses_that_hit_the_data_and_the_trunks_next_guess():
    model = drafting_model(mtp_depth=2)  # depth 1 often guesses what the trunk will
    x = torch.randint(0, 61, (2, 17))
    guesses = []
    model.mtp[0].register_forward_hook(lambda mod, args, out: guesses.append(model.head(out[1]).argmax(-1)))
    model(x[:, :-1], x[:, 1:])
    guess = guesses[0]  # [2, 15]: depth 1's guess at position i of the token at i + 2
    y = x[:, 1:].clone()
    y[:, 1:] = (guess + 1) % 61  # wrong everywhere but at 5 positions per row
    y[:, 1:6] = guess[:, :5]
    y[0, 1] = -1  # ignored, as in the loss
    logits, _, parts, _ = model(x[:, :-1], y)
    assert parts["mtp_acc"].item() == pytest.approx(9 / 29)
    # the trunk guesses the token at i + 2 at position i + 1: a greedy draft is kept when the two agree
    agree = (guess == logits[:, 1:].argmax(-1)).flatten()[torch.arange(30) != 0].float().mean()
    assert 0 < agree < 1 and parts["mtp_agree"] == agree
    plain = Transformer(tiny()).eval()
    plain_parts = plain(x[:, :-1], y).parts
    training_parts = model.train()(x[:, :-1], y).parts  # training steps skip the two argmaxes
    assert not {"mtp_acc", "mtp_agree"} & (plain_parts.keys() | training_parts.keys())
