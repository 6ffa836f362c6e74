"""DeepSeek-V4 as options of model.py: the same logits as transformers' DeepseekV4ForCausalLM on tiny models with
every layer kind (sliding, CSA whose indexer selects, HCA past its rate), hash and learned MoE layers and several
residual streams; the weights import from transformers' names; every new key has a rule. Decoding with V4's caches
gives the tokens of decoding without them and of transformers' generate, and slides past the context as the banded
full forward, row by row, in sample.py, the engine and serve.py."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import convert
import sample
import train
from configurator import configure
from conftest import TINY, index_grads, rows_decode_as_alone, rows_slide_as_the_full_forward, save_model, \
    script_error, warm_up
from generate import Sampling, drafts_per_step, generate, verify
from model import ConfigError, Gate, ModelConfig, Transformer
from test_engine import complete

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TOL = 1e-4  # float32 logits of the two implementations; they agree to about 1e-6
T = 40  # tokens: past the window (8), 10 CSA entries of which the indexer keeps 3, 5 HCA entries


def tiny(**kw):
    """A V4-style model small enough for a second: every option on, each at a size where it changes the logits
    (the clamp at 0.5 cuts activations of a few units, the window and top-k are shorter than the sequence)."""
    base = dict(vocab_size=64, block_size=64, n_layer=3, n_embd=32, n_head=4, attn="hybrid", q_lora_rank=24,
                qk_nope_head_dim=12, qk_rope_head_dim=4, o_groups=2, o_lora_rank=8, sliding_window=8,
                layer_types=["sliding", "csa", "hca"], csa_rate=4, hca_rate=8, index_n_heads=16, index_head_dim=8,
                index_topk=3, hc_mult=3, hc_sinkhorn_iters=3, n_routed_experts=4, n_activated_experts=2,
                n_shared_experts=1, moe_inter_dim=16, n_dense_layers=0, n_hash_layers=1, score_func="sqrtsoftplus",
                route_scale=1.5, swiglu_limit=0.5)
    return ModelConfig(**{**base, **kw})


def reference(cfg, seed=0):
    """transformers' model for cfg (the config.json export writes), eager, with random weights an initialisation
    would not give: norms away from 1, non-zero sinks, position biases and mHC biases, a random hash table and
    routing bias."""
    config = transformers.DeepseekV4Config.from_dict(convert.hf_config(cfg, None, torch.float32))
    config._attn_implementation, config._experts_implementation = "eager", "eager"
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.size(0), cfg.n_routed_experts, generator=g).argsort(-1)[:, :b.size(1)])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def imported(cfg, ref):
    """model.py's model with the reference's weights, through convert.py's import mapping."""
    model = Transformer(cfg).eval()
    model.load_state_dict(convert.from_hf(convert.unfuse_experts(dict(ref.state_dict())), cfg))
    return model


CONFIGS = {
    "every kind, hash and sqrtsoftplus": {},
    "csa and hca, sigmoid, YaRN on the compressed layers": dict(
        layer_types=["csa", "hca", "csa"], score_func="sigmoid", n_hash_layers=0, hc_mult=2, hc_sinkhorn_iters=20,
        block_size=64, original_seq_len=16, rope_factor=4.0, sliding_window=5),
    "sliding only, four streams, two hash layers": dict(
        layer_types=["sliding"] * 3, hc_mult=4, n_hash_layers=2, swiglu_limit=0.0, o_groups=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers_deepseek_v4(name):
    cfg = tiny(**CONFIGS[name])
    ref = reference(cfg)
    ours = imported(cfg, ref)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(idx).logits, ours(idx)[0]
    assert want.abs().max() > 1  # logits of a few units, not a model that ignores its input
    assert (want - got).abs().max() < TOL


@pytest.mark.parametrize("length", [1, 3, 6])
def test_logits_equal_transformers_before_the_first_compressed_entries(length):
    """Prompts shorter than the CSA rate (4) or the HCA rate (8): no entry yet, or only CSA's."""
    cfg = tiny()
    ref = reference(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ref(idx).logits - imported(cfg, ref)(idx)[0]).abs().max() < TOL


def test_the_fixture_sees_each_part():
    """Turning off the clamp, the indexer's selection, the window or the hash table moves the logits far past
    the tolerance: the comparison above would see an error in any of them."""
    cfg = tiny()
    ref = reference(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
    breaks = {"clamp": lambda m: [setattr(moe.experts, "limit", 0.0) for moe in m.moes],
              "indexer": lambda m: setattr(m.layers[1].attn.indexer, "topk", 10),
              "window": lambda m: setattr(m.layers[0].attn, "window", T),
              "hash": lambda m: m.layers[0].ffn.gate.tid2eid.copy_(m.layers[0].ffn.gate.tid2eid.roll(1, 0)),
              "sink": lambda m: m.layers[2].attn.attn_sink.data.zero_(),
              "sinkhorn": lambda m: setattr(m.layers[1].hc_ffn, "iters", 1)}
    for part, brk in breaks.items():
        ours = imported(cfg, ref)
        with torch.no_grad():
            brk(ours)
            assert (want - ours(idx)[0]).abs().max() > 100 * TOL, part


def test_the_cached_decoder_drafts_from_the_hyper_connection_streams():
    """With hc_mult > 1 the MTP module reads the trunk's streams (Output.hidden [B, T, hc_mult, D]) in the cached
    decoder's speculative decoding too (MLA, whose caches exist): greedy, the text of plain greedy decoding."""
    from test_model import drafting_model
    model = drafting_model(mtp_depth=1, hc_mult=2)
    x = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(8))
    speculation = {"drafted": 0, "accepted": 0}
    assert torch.equal(generate(model, x, 30, temperature=0, speculative=True, speculation=speculation),
                       generate(model, x, 30, temperature=0))
    assert 0 < speculation["accepted"] < speculation["drafted"]


def test_v3_defaults_build_no_v4_part():
    """The defaults are today's model: no streams, no hash tables, no clamp, MLA attention."""
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_embd=32, n_head=2)
    names = set(Transformer(cfg).state_dict())
    assert not [n for n in names if "hc_" in n or "tid2eid" in n or "attn_sink" in n or "compressor" in n]
    assert (cfg.hc_mult, cfg.n_hash_layers, cfg.swiglu_limit, cfg.layer_types) == (1, 0, 0.0, [])


@pytest.mark.parametrize("kw, key", [
    (dict(hc_mult=0), "hc_mult"),
    (dict(layer_types=["sliding"] * 2), "layer_types"),
    (dict(layer_types=["sliding", "csa", "full"]), "layer_types"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(o_groups=3), "o_groups"),
    (dict(n_hash_layers=4), "n_hash_layers"),
    (dict(n_hash_layers=1, vocab_size=0), "vocab_size"),
    (dict(score_func="relu"), "score_func"),
    (dict(attn="mla", layer_types=["csa"] * 3), "layer_types"),
    (dict(layer_types=["sliding", "hca", "hca"], index_warmup=5), "index_warmup"),
])
def test_each_v4_key_has_a_rule_naming_it(kw, key):
    with pytest.raises(ConfigError, match=key):
        tiny(**kw)


def test_hybrid_without_layer_types_is_all_sliding():
    assert tiny(layer_types=[]).layer_types == ["sliding"] * 3


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_with_the_caches_equals_without_and_transformers_generate(name, tmp_path):
    """10 prompt tokens, 20 new: decoding with V4's caches (the window's keys, the compressors' pending tokens and
    entries, CSA's index keys; 7 CSA entries of which the indexer keeps 3, 3 HCA entries) gives the tokens of
    decoding without a cache and of transformers' generate with its own caches for the model convert.py
    exports, token for token."""
    cfg = tiny(**CONFIGS[name])
    model = imported(cfg, reference(cfg))  # weights of a few units: text that depends on its context
    ckpt = tmp_path / "ckpt.pt"
    torch.save(dict(model_args=dataclasses.asdict(cfg), model=model.state_dict(), iter_num=0,
                    config={"dataset": "none"}), ckpt)
    convert.main(["export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    cached = generate(model, idx, 20, temperature=0)
    assert torch.equal(cached, generate(model, idx, 20, temperature=0, use_cache=False))
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                             use_cache=True, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cached, theirs) and min(len(set(row[10:].tolist())) for row in cached) >= 4


@torch.no_grad()
def test_cached_rows_slide_past_the_context_as_the_banded_full_forward():
    """A 16-token context, 48 tokens: the window (8), the CSA entries (4 tokens each, the indexer keeping 2 of the
    4 a query may see) and the HCA entries (8 tokens) slide past the context's edge, where a query sees the
    entries whose position lies in its last 16 tokens, as it sees keys. The caches keep the window's last 8 keys
    and the compressors' last 8 tokens (CSA: two windows of 4; HCA: one of 8). Rows at their own offsets, in
    cache rows that held other sequences, decode in ragged right-padded steps (as drafts are), or lockstep: each
    gets the logits of the full forward over its 48 tokens."""
    cfg = tiny(block_size=16, index_topk=2)
    model = imported(cfg, reference(cfg))
    x = torch.randint(0, cfg.vocab_size, (3, 48), generator=torch.Generator().manual_seed(5))
    full = model(x).logits
    for layer in model.layers:  # the band is seen: entries from further back would change the logits
        layer.attn.band = 48
    assert not torch.allclose(full[:, -1], model(x).logits[:, -1], atol=1e-3)
    for layer in model.layers:
        layer.attn.band = 16
    rows_slide_as_the_full_forward(model, x, full, torch.tensor([3, 0, 2]), [2, 13, 7], 1e-4)
    model.setup_cache(1)
    assert [tuple(c.shape[1:]) for c in model.layers[1].attn.cache] == [(8, 16), (8, 32), (8, 32), (5, 16),
                                                                      (8, 16), (8, 16), (5, 8)]
    rows_decode_as_alone(model, cfg.vocab_size, [3, 11, 6], torch.tensor([4, 0, 2]), 20, model.cache_length(), 14)


def test_the_engine_decodes_v4_rows_at_their_own_offsets_as_each_alone():
    """Ragged prompts (1 to 16 tokens, the context) through the serving engine three rows at a time, prefilled
    together and joining as others leave: each row's greedy tokens, past the context's edge, are those of
    decoding its prompt alone without a cache."""
    cfg = tiny(vocab_size=61, block_size=16, index_topk=2)
    model = imported(cfg, reference(cfg))
    g = torch.Generator().manual_seed(6)
    requests = [(torch.randint(0, 61, (n,), generator=g).tolist(), m, dict(temperature=0))
                for n, m in zip([1, 5, 12, 16, 9], [24, 8, 24, 24, 12])]
    done, _ = complete(model, requests, speculative=False, max_batch=3)
    for (ids, m, _), (tokens, _, reason, _) in zip(requests, done):
        alone = generate(model, torch.tensor([ids]), m, temperature=0, use_cache=False)[0, len(ids):].tolist()
        assert tokens == alone and reason == "length"


V4_CHECKPOINT = dict(attn="hybrid", q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=16, csa_rate=2,
                     layer_types=["csa", "hca"], hca_rate=4, index_topk=3, index_n_heads=16, index_head_dim=8,
                     hc_mult=2, n_hash_layers=1, score_func="sqrtsoftplus", swiglu_limit=10.0)


def test_sample_py_and_serve_py_decode_a_v4_checkpoint_past_its_context_with_the_caches(tmp_path, capsys):
    """sample.py with the caches writes the greedy text of sample.py --use_cache=False, and serve.py serves it: 60
    tokens after a 6-token prompt slide past the 48-token context."""
    openai = pytest.importorskip("openai")
    import serve  # with the serving extras (fastapi)
    ckpt = save_model(str(tmp_path / "v4" / "ckpt.pt"), **V4_CHECKPOINT)
    args = [f"--ckpt={ckpt}", "--start=ROMEO:", "--max_new_tokens=60", "--temperature=0", "--dtype=float32", "--quiet"]
    sample.main(args)
    cached = capsys.readouterr().out
    sample.main([*args, "--use_cache=False"])
    assert capsys.readouterr().out == cached and len(set(cached[-31:])) >= 8  # past the context it still varies
    sample.main([*args[:-2], "--dtype=bfloat16", "--quiet"])  # bf16 caches: the autocast dtype, stored as such
    assert len(capsys.readouterr().out) == len(cached)
    app, _, _ = serve.build([f"--ckpt={ckpt}", "--dtype=float32"])
    url, stop = serve.start_in_thread(app)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        served = client.completions.create(model="v4", prompt="ROMEO:", max_tokens=60, temperature=0)
    finally:
        stop()
    assert "ROMEO:" + served.choices[0].text + "\n" == cached


def test_training_reaches_every_v4_parameter_and_csa_indexer_learns_only_from_its_kl():
    """One backward pass gives every parameter a gradient, the MTP module's too. CSA's indexer picks discretely,
    so it learns as V3.2's report trains DSA's (V4's report is silent): from its KL loss to the attention its
    entries get, on detached inputs; that loss reaches nothing else."""
    torch.manual_seed(0)
    model = Transformer(tiny(mtp_depth=1)).train()
    idx = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(4))
    (with_kl, parts), (without, _) = index_grads(model, idx, 1.0), index_grads(model, idx, 0.0)
    assert parts["indexer"] > 0 and parts["mtp"] > 0
    for name, g in with_kl.items():
        assert g is not None and g.any(), name
        if ".indexer." in name:
            assert not without[name].any(), name  # only the KL reaches the indexer
        else:
            assert torch.equal(g, without[name]), name  # the KL reaches nothing else


def test_warming_up_csa_sees_every_ready_entry_and_only_its_indexer_learns_toward_it():
    """index_warmup's steps, as DSA's: CSA attends to every compressed entry whose window has ended (the model with
    index_topk above the entries), the indexer's KL falls, and no other parameter moves."""
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    dense = Transformer(tiny(index_topk=T)).eval()
    dense.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (4, T + 1), generator=torch.Generator().manual_seed(5))
    model.warm_up_indexers(True)
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], dense(idx)[0])
        model.warm_up_indexers(False)
        assert not torch.equal(model(idx)[0], dense(idx)[0])  # sparse, the picks matter
    kl, moved = warm_up(model, idx, 10, 1e-2)
    assert kl[-1] < 0.8 * kl[0], kl
    assert moved == {n for n, _ in model.named_parameters() if ".indexer." in n}


def drafts_without_cache(model, idx, pending):
    """Greedy MTP drafts after the text idx [1, T] and its pending token, without a cache: each depth over the
    whole text (the trunk's states, or the depth before's), read at its last position."""
    h, tokens, drafts = model(idx).hidden, torch.cat([idx, pending], 1), []
    cos, sin = model.rope(0, idx.size(1))
    for k, module in enumerate(model.mtp, start=1):
        h, out = module(h, model.embed(tokens[:, k:]), cos, sin)
        drafts.append(model.head(out[:, -1]).argmax(-1, keepdim=True))
        tokens = torch.cat([tokens, drafts[-1]], 1)
    return torch.cat(drafts, 1)


def with_mtp(cfg):
    """A V4 model with MTP modules: transformers' trunk for cfg (weights of a few units), MTP modules drawn as
    reference() draws its weights."""
    trunk = dataclasses.replace(cfg, mtp_depth=0)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.load_state_dict(imported(trunk, reference(trunk)).state_dict(), strict=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.mtp.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else 0.3 * torch.randn(p.shape, generator=g))
        for m in model.mtp.modules():
            if isinstance(m, Gate):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@torch.no_grad()
def test_v4_mtp_reads_the_trunks_streams_and_its_drafts_verify_to_plain_greedy_text_without_a_cache():
    """V4's MTP module (its reference's MTPBlock: the trunk's hc_mult streams in, its own HyperHead out) is what
    the MTP loss trains and reads no later token than its own; its drafts, verified by the trunk's forward over
    the text and the drafts (generate.verify), give the text of plain greedy decoding, some drafts kept; so does
    speculative decoding through generate.Decoder with V4's caches."""
    cfg = tiny(mtp_depth=1)
    model = with_mtp(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(6))
    out = model(idx[:, :-1], idx[:, 1:])
    assert out.hidden.shape == (2, T, cfg.hc_mult, cfg.n_embd)
    cos, sin = model.rope(0, T - 1)
    logits = model.head(model.mtp[0](out.hidden[:, :-1], model.embed(idx[:, 1:-1]), cos, sin)[1])  # of tokens i + 2
    assert torch.allclose(out.parts["mtp"], F.cross_entropy(logits.flatten(0, 1), idx[:, 2:].flatten()))
    for t in (3, 17, 30):  # over the prefix alone, the same guess
        prefix = model(idx[:1, :t + 1]).hidden
        c, s = model.rope(0, t)
        guess = model.head(model.mtp[0](prefix[:, :-1], model.embed(idx[:1, 1:t + 1]), c, s)[1])
        assert torch.allclose(guess[0, -1], logits[0, t - 1], atol=1e-5)
    m = model.mtp[0].eh_proj.weight  # now a drafter: the next token's embedding passed on, the state ignored
    m.zero_()
    m[:, :cfg.n_embd] = torch.eye(cfg.n_embd)
    text, kept, drafted = idx[:1, :8], 0, 0
    pending = model(text).logits[:, -1:].argmax(-1)
    while text.size(1) < 8 + 24:
        drafts = drafts_without_cache(model, text, pending)
        after = model(torch.cat([text, pending, drafts], 1)).logits[:, -1 - drafts.size(1):]
        tokens, n = verify(after, drafts, None, Sampling(temperature=0))
        n = n.item()
        text, pending = torch.cat([text, pending, tokens[:, :n]], 1), tokens[:, n:n + 1]
        kept, drafted = kept + n, drafted + drafts.size(1)
    assert torch.equal(text, generate(model, idx[:1, :8], text.size(1) - 8, temperature=0, use_cache=False))
    assert 0 < kept < drafted
    speculation = {"drafted": 0, "accepted": 0}  # and through the one decoder, with V4's caches: the same text
    assert torch.equal(generate(model, idx[:, :10], 30, temperature=0, speculative=True, speculation=speculation),
                       generate(model, idx[:, :10], 30, temperature=0))
    assert 0 < speculation["accepted"] < speculation["drafted"]
    # V4's compressed caches cannot take a chained module's guesses: one draft per module, more refused
    assert drafts_per_step(cfg) == 1
    with pytest.raises(ValueError, match="one per MTP module"):
        drafts_per_step(cfg, 2)


def test_export_loads_as_deepseek_v4_with_the_same_logits_and_imports_back_bit_exactly(tmp_path):
    """convert.py export writes config.json and the weights (hash table included) as transformers reads them, and
    the MTP module as DeepSeek-V4's checkpoints hold it (mtp.0.*, the reference's names), which transformers drops:
    the load reports nothing missing or unexpected and gives model.py's logits; import gives back every tensor
    and the configuration, bit for bit."""
    cfg = tiny(block_size=48, mtp_depth=1)
    model = with_mtp(cfg)  # weights of a few units, a random hash table and routing biases
    ckpt = tmp_path / "ckpt.pt"
    torch.save(dict(model_args=dataclasses.asdict(cfg), model=model.state_dict(), iter_num=0,
                    config={"dataset": "none"}), ckpt)
    convert.main(["export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}"])
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        mtp = {k for k in f.keys() if k.startswith("mtp.")}
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.hc_head_fn", "mtp.0.hc_attn_fn", "mtp.0.attn_norm.weight",
            "mtp.0.attn.attn_sink", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias", "mtp.0.ffn.experts.3.w2.weight",
            "mtp.0.ffn.shared_experts.w1.weight", "mtp.0.norm.weight"} <= mtp
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                                 output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV4ForCausalLM" and not any(info.values()), info
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf.eval()(idx).logits - model(idx)[0]).abs().max() < TOL
    back = checkpoint.load_model(convert.main(["import", f"--from={tmp_path / 'hf'}", f"--to={tmp_path / 'back'}"]))[0]
    assert dataclasses.replace(back.cfg, original_seq_len=cfg.original_seq_len) == cfg  # YaRN off either way
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


V4_PRO = dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
              o_lora_rank=1024, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
              index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])  # its config.json's shape


@pytest.mark.parametrize("shape, count", [({}, 284_325_869_015), (V4_PRO, 1_572_997_179_491)], ids=["flash", "pro"])
def test_v4_shapes_have_transformers_parameter_count(shape, count):
    """transformers' default DeepseekV4Config (V4-Flash's widths) and V4-Pro's published shape, read by import's
    config reader and built on the meta device, have exactly the parameters transformers counts (untied head, no
    MTP; measured in /work/shared/docs/transformers-deepseek-v32-v4.md)."""
    cfg = convert.v4_model_config(transformers.DeepseekV4Config(**shape).to_dict(), 0)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == count


HYBRID = ['--attn=hybrid', '--q_lora_rank=16', '--o_lora_rank=8', '--index_head_dim=8', '--index_n_heads=2']


@pytest.mark.parametrize("key, args", [
    ("hc_mult", ['--hc_mult=0']),
    ("layer_types", [*HYBRID, "--layer_types=['sliding']"]),
    ("layer_types", [*HYBRID, "--layer_types=['sliding', 'full']"]),
    ("sliding_window", [*HYBRID, '--sliding_window=0']),
    ("o_groups", [*HYBRID, '--o_groups=3']),
    ("n_hash_layers", ['--n_hash_layers=3']),
    ("layer_types", ["--layer_types=['csa', 'hca']"]),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_train_refuses_a_bad_v4_key_in_one_line_naming_it(data, tmp_path, capsys, key, args):
    out = tmp_path / "out"
    err = script_error(capsys, lambda argv: train.train(*configure(train.DEFAULTS, argv, rules=train.RULES)),
                       *TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", *args)
    assert key in err and not out.exists()  # refused before anything is made


def test_train_py_trains_a_v4_model_with_its_loop_unchanged(data, tmp_path):
    """A few steps of train.py on a V4-style model (every option on) lower the loss, and the checkpoint it writes
    loads and exports."""
    out = tmp_path / "out"
    args = [*TINY, f"--data_dir={data}", "--dataset=tiny", f"--out_dir={out}", *HYBRID, "--hc_mult=2",
            "--layer_types=['csa', 'hca']", "--csa_rate=2", "--hca_rate=4", "--index_topk=2", "--sliding_window=4",
            "--o_groups=2", "--n_dense_layers=0", "--n_hash_layers=1", "--score_func=sqrtsoftplus", "--swiglu_limit=10",
            "--mtp_depth=1", "--index_warmup=3", "--max_iters=30", "--eval_interval=30", "--eval_iters=2",
            "--sample_interval=30", "--sample_tokens=8", "--sample_prompt=the ", "--learning_rate=1e-2"]  # a sample: recompute
    train.train(*configure(train.DEFAULTS, args, rules=train.RULES))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["indexer"] > 0 and r["mtp"] > 0 for r in rows if "loss" in r)  # CSA's KL, the MTP loss
    assert [r for r in rows if "val_loss" in r][-1]["val_mtp_acc"] > 0
    assert [len(r["sample"]) >= 8 for r in rows if "sample" in r] == [True]
    model = checkpoint.load_model(str(out / "ckpt.pt"))[0]
    assert model.cfg.attn == "hybrid" and model.cfg.hc_mult == 2 and model.cfg.mtp_depth == 1


def test_add_indexers_refuses_a_v4_model(tmp_path, capsys):
    """convert.py add-indexers gives MLA DSA's indexers; a V4 model's CSA layers have their own."""
    cfg = tiny(layer_types=["sliding", "hca", "hca"], index_topk=0)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(dict(model_args=dataclasses.asdict(cfg), model=Transformer(cfg).state_dict(), iter_num=0,
                    config={"dataset": "none"}), ckpt)
    err = script_error(capsys, convert.main, "add-indexers", f"--ckpt={ckpt}", f"--to={tmp_path / 'dsa'}",
                       "--index_topk=4")
    assert "attn='hybrid'" in err and not (tmp_path / "dsa").exists()
