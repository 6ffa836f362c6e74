"""DeepSeek Sparse Attention (DeepSeek-V3.2's lightning indexer, model.Indexer): index_topk=0 is the dense model,
with no more tokens than index_topk it is exactly dense MLA, past that each query reads only its picks, in training
and from the cache; the indexer learns by its KL loss alone, and warming up only it learns."""
import dataclasses

import pytest
import torch

import model as M
from generate import generate
from conftest import index_grads, rows_decode_as_alone, warm_up
from model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOPK = 6


def dsa(**kw):
    """A tiny DSA config: 16 indexer heads, so that no two index scores tie at zero (all ReLUs off)."""
    base = dict(vocab_size=61, block_size=48, n_layer=2, n_embd=64, n_head=4, q_lora_rank=24, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_dense_layers=1,
                index_topk=TOPK, index_n_heads=16, index_head_dim=16)
    return ModelConfig(**{**base, **kw})


def reading_model(**kw):
    """A model whose attention and indexer read their context: weights scaled up from the initialisation, so that
    attention is far from uniform and the index scores far apart (the picks then change the logits)."""
    torch.manual_seed(0)
    model = Transformer(dsa(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4 if ".indexer." in name and p.dim() > 1 else 3 if p.dim() > 1 else 1)
    return model


def dense_twin(model):
    """The same weights without indexers (index_topk=0)."""
    twin = Transformer(dataclasses.replace(model.cfg, index_topk=0)).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    return twin


@pytest.mark.parametrize("kw, key", [(dict(index_topk=-1), "index_topk=-1"),
                                      (dict(attn="gqa", n_kv_head=2, q_lora_rank=0), "attn='gqa'"),
                                      (dict(q_lora_rank=0), "q_lora_rank=0"),
                                      (dict(index_head_dim=4), "index_head_dim=4"),
                                      (dict(index_topk=0, index_warmup=10), "index_warmup=10")])
def test_configurations_the_reference_does_not_have_are_refused_naming_the_key(kw, key):
    with pytest.raises(M.ConfigError) as e:
        dsa(**kw)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_index_topk_zero_is_todays_model_and_old_checkpoints_load_unchanged():
    cfg = dsa(index_topk=0)
    model = Transformer(cfg)
    assert not any(".indexer." in k for k in model.state_dict()) and not model.indexed
    old_args = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("index_")}
    Transformer(ModelConfig(**old_args)).load_state_dict(model.state_dict())  # strict: the same tensors


@torch.no_grad()
def test_with_no_more_tokens_than_index_topk_it_is_exactly_dense_mla():
    model = reading_model()
    twin = dense_twin(model)
    x = torch.randint(0, 61, (2, 30))
    assert torch.equal(model(x[:, :TOPK])[0], twin(x[:, :TOPK])[0])
    # past index_topk tokens the picks matter: later positions differ, the first index_topk do not (but for
    # rounding: the sparse path writes attention out, the dense one runs SDPA)
    sparse, dense = model(x)[0], twin(x)[0]
    assert torch.allclose(sparse[:, :TOPK], dense[:, :TOPK], atol=1e-5)
    assert (sparse[:, TOPK:] - dense[:, TOPK:]).abs().amax() > 0.1
    # index_topk at or above the context is dense too
    wide = Transformer(dataclasses.replace(model.cfg, index_topk=48)).eval()
    wide.load_state_dict(model.state_dict())
    assert torch.equal(wide(x)[0], dense)


@torch.no_grad()
def test_each_query_reads_only_the_keys_its_indexer_picks():
    model = reading_model()
    attn, T = model.layers[0].attn, 20
    x = torch.randn(1, T, 64)
    cos, sin = model.cos[:T], model.sin[:T]
    c_q = attn.q_norm(attn.wq_a(x))
    scores = M.lightning_scores(*attn.indexer(x, c_q, cos, sin))
    picks, allowed = M.select(scores, M.visible(0, T, T, T, T, x.device), TOPK)
    assert allowed[0, TOPK:].all() and (picks[0, TOPK:] <= torch.arange(TOPK, T)[:, None]).all()  # causal prefix
    q, k, v = (torch.randn(1, 4, T, d) for d in (24, 24, 16))
    t = 15  # one query: values it did not pick change nothing, one it picked changes its output
    out = attn.sparse_attend(q, k, v, (x, c_q, cos, sin), 0.0)[:, :, t]
    unpicked = [s for s in range(t + 1) if s not in picks[0, t]]
    v2 = v.clone()
    v2[:, :, unpicked] += 5
    assert torch.equal(attn.sparse_attend(q, k, v2, (x, c_q, cos, sin), 0.0)[:, :, t], out)
    v2[:, :, picks[0, t, 0]] += 5
    assert not torch.allclose(attn.sparse_attend(q, k, v2, (x, c_q, cos, sin), 0.0)[:, :, t], out)


@torch.no_grad()
def test_cached_decoding_reads_the_picks_of_the_full_forward():
    # one-token steps gather each query's picks from the cache; a long prefill masks them; both give the logits
    # of the training forward, whose mask covers the selection
    model = reading_model()
    x = torch.randint(0, 61, (2, 40))
    full = model(x)[0]
    model.setup_cache(2, 48)
    assert [tuple(t.shape) for t in model.layers[0].attn.cache] == [(2, 48, 32), (2, 48, 8), (2, 48, 16)]
    steps = [model(x[:, :10], start_pos=0)[0]] + [model(x[:, t:t + 1], start_pos=t)[0] for t in range(10, 40)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    model.setup_cache(2, 48)
    assert torch.allclose(model(x, start_pos=0)[0], full, atol=1e-5)
    model.setup_cache(0, 0)


@torch.no_grad()
def test_rows_at_their_own_positions_decode_as_each_sequence_alone():
    # the serving engine's continuous batching: each row in its own cache row at its own position, over rows
    # that held a longer earlier sequence (whose indexer keys must stay out of the picks)
    model = reading_model()
    rows_decode_as_alone(model, 61, [3, 11, 7], torch.tensor([4, 0, 2]), 8, 48, 30)


def test_greedy_text_with_the_cache_is_the_text_without_it():
    # 70 new tokens slide past the 48-token context: the rolling caches' indexer keys slide with the latents
    model = reading_model()
    x = torch.randint(0, 61, (2, 5))
    assert torch.equal(generate(model, x, 70, temperature=0), generate(model, x, 70, temperature=0, use_cache=False))


def test_the_decoder_serves_ragged_rows_each_with_its_own_greedy_text_with_mtp_drafts():
    # the serving engine's path: rows of different prompt lengths at their own positions, continuously batched,
    # past the context, with MTP drafting (each row's MTP block has its own indexer and cache)
    from generate import Decoder, Sampling
    model = reading_model(mtp_depth=1)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 20, 9)]
    greedy = Sampling(temperature=0)
    with Decoder(model, rows=4, speculative=True) as decoder:
        rows = [3, 0, 1]
        first, _ = decoder.start(rows, prompts, [greedy] * 3)
        texts = [[t] for t in first]
        while min(map(len, texts)) < 55:
            for text, new in zip(texts, decoder.step(rows)[0]):
                text += new
        assert 0 < decoder.drafting["accepted"] < decoder.drafting["drafted"]
    for prompt, text in zip(prompts, texts):
        assert text[:55] == generate(model, torch.tensor([prompt]), 55, temperature=0)[0, len(prompt):].tolist()


def test_the_indexer_loss_is_the_kl_from_the_head_averaged_attention_to_the_indexer_softmax():
    torch.manual_seed(0)
    T, mask = 5, M.visible(0, 5, 5, 5, 5, "cpu")
    scores, q, k = torch.randn(1, T, T), torch.randn(1, 3, T, 8), torch.randn(1, 3, T, 8)
    probs = M.attention_probs(q, k, mask, 0.5)
    p = ((q @ k.transpose(-1, -2)) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1).mean(1)[0]
    log_q = scores[0].masked_fill(~mask, float("-inf")).log_softmax(-1)
    want = sum(sum(p[t, s] * (p[t, s].log() - log_q[t, s]) for s in range(t + 1)) for t in range(T)) / T
    assert torch.allclose(M.index_kl(scores, probs, mask), want, atol=1e-6)


def test_sparse_training_the_indexer_learns_only_from_its_kl_and_the_model_only_from_the_lm_loss():
    model = reading_model().train()
    x = torch.randint(0, 61, (2, 31))
    (with_kl, parts), (without, _) = index_grads(model, x, 1.0), index_grads(model, x, 0.0)
    assert parts["indexer"] > 0
    for name, g in with_kl.items():
        if ".indexer." in name:
            assert g.abs().amax() > 0 and not without[name].any(), name  # only the KL reaches the indexer
        elif name in without and without[name] is not None:
            assert torch.equal(g, without[name]), name  # the KL reaches nothing else


def test_warming_up_attention_is_dense_and_only_the_indexers_learn_toward_it():
    model = reading_model().train()
    x = torch.randint(0, 61, (4, 33))
    model.warm_up_indexers(True)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], dense_twin(model)(x)[0])
    kl, moved = warm_up(model, x, 15, 3e-3)
    assert kl[-1] < 0.8 * kl[0]
    assert not model.moe_load.any()  # no routing counts: the balancing bias stays too
    assert moved == {n for n, _ in model.named_parameters() if ".indexer." in n}


def test_train_py_warms_up_then_trains_sparse_and_logs_the_indexer_loss(data, tmp_path):
    import train
    from configurator import configure
    from conftest import TINY, rows
    out = str(tmp_path / "out")
    args = [*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", "--q_lora_rank=16", "--index_topk=4",
            "--index_n_heads=4", "--index_head_dim=8", "--index_warmup=2", "--max_iters=4", "--eval_interval=4"]
    train.train(*configure(train.DEFAULTS, args))
    steps = [r for r in rows(out) if "loss" in r]
    assert len(steps) == 4 and all(r["indexer"] > 0 for r in steps)
    assert [r for r in rows(out) if "val_loss" in r][-1]["val_indexer"] > 0


# ----------------------------------------------------------------------------- DeepseekV32ForCausalLM
def transformers_or_skip():
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


@torch.no_grad()
def test_export_is_deepseek_v32_with_the_logits_and_picks_of_transformers_and_imports_back_exactly(tmp_path):
    transformers = transformers_or_skip()
    import checkpoint
    import convert
    model = reading_model(mtp_depth=0, n_expert_groups=2, n_limited_groups=1)
    for m in model.moes:
        m.gate.bias.copy_(0.1 * torch.randn(m.gate.bias.shape))
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model_args=dataclasses.asdict(model.cfg), model=model.state_dict(), iter_num=0,
                    config={"dataset": "none"}), path)
    convert.main(["export", f"--ckpt={path}", f"--to={tmp_path / 'hf'}"])
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    config._attn_implementation, config._experts_implementation = "eager", "eager"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", config=config).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 tokens, index_topk 6
    ours_scores, theirs = [], []
    hooks = [layer.attn.indexer.register_forward_hook(lambda m, a, out: ours_scores.append(M.lightning_scores(*out)))
             for layer in model.layers]
    hooks += [layer.self_attn.indexer.register_forward_hook(lambda m, a, out: theirs.append(out))
              for layer in hf.model.layers]
    ours_logits, hf_logits = model(idx)[0], hf(idx).logits
    for h in hooks:
        h.remove()
    assert (ours_logits - hf_logits).abs().max() < 1e-4
    mask = M.visible(0, 40, 40, 40, 40, "cpu")
    for scores, picks in zip(ours_scores, theirs):
        mine, allowed = M.select(scores, mask, TOPK)
        mine = mine.masked_fill(~allowed, -1).sort(-1)[0]
        theirs_allowed = picks.long().masked_fill(~mask.expand(2, -1, -1).gather(-1, picks.long()), -1).sort(-1)[0]
        assert torch.equal(mine, theirs_allowed)  # the same keys for every query
    back = checkpoint.load_model(convert.main(["import", f"--from={tmp_path / 'hf'}", f"--to={tmp_path / 'back'}"]))[0]
    assert back.cfg.index_topk == TOPK and back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(back(idx)[0], ours_logits)


def test_the_default_v32_configuration_has_transformers_parameter_count():
    transformers = transformers_or_skip()
    cfg = ModelConfig(vocab_size=129280, block_size=4096, n_layer=61, n_embd=7168, n_head=128, q_lora_rank=1536,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, inter_dim=18432,
                      n_dense_layers=3, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
                      moe_inter_dim=2048, n_expert_groups=8, n_limited_groups=4, route_scale=2.5, index_topk=2048,
                      index_n_heads=64, index_head_dim=128)
    with torch.device("meta"):
        ours = Transformer(cfg).num_params()
        reference = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config())
        theirs = sum(p.numel() for p in reference.parameters())
    assert ours == theirs == 671_877_929_216


def test_a_trained_dense_model_gets_fresh_indexers_then_warms_them_up_and_trains_sparse(data, tmp_path, capsys):
    import checkpoint
    import convert
    import train
    from configurator import configure
    from conftest import TINY, rows, script_error
    dense_dir, out = str(tmp_path / "dense"), str(tmp_path / "dsa")
    train.train(*configure(train.DEFAULTS, [*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={dense_dir}",
                                            "--q_lora_rank=16", "--max_iters=2"]))
    assert "index_head_dim=4" in script_error(capsys, convert.main, "add-indexers", f"--out_dir={dense_dir}",
                                           f"--to={out}", "--index_topk=4", "--index_head_dim=4")  # below rope dims
    convert.main(["add-indexers", f"--out_dir={dense_dir}", f"--to={out}", "--index_topk=4", "--index_n_heads=4",
                  "--index_head_dim=8", "--index_warmup=2"])
    dense, _ = checkpoint.load_model(checkpoint.find_checkpoint(dense_dir, ("ckpt.pt",)))
    sparse, _ = checkpoint.load_model(f"{out}/ckpt.pt")
    x = torch.randint(0, dense.cfg.vocab_size, (2, 4))
    with torch.no_grad():
        assert torch.equal(sparse(x)[0], dense(x)[0]) and len(sparse.indexed) == 2
    train.train(*configure(train.DEFAULTS, [f"--resume={out}", "--max_iters=4", "--eval_interval=4"]))
    steps = [r for r in rows(out) if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and all(r["indexer"] > 0 for r in steps)
