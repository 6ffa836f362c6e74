"""What a model configuration may be: ModelConfig checks itself, in one line naming the key, and every script
that takes model keys (train.py, convert.py) refuses exactly what it refuses, with the same line."""
import dataclasses

import pytest

import convert
import train
from configurator import configure
from conftest import script_error
from model import ATTENTION_KINDS, SCORE_FUNCS, ConfigError, ModelConfig

# (keyword arguments, the start of the line that refuses them): each key alone, then keys that must fit together
BAD = [(dict(attn="x"), "attn='x' is not allowed: attn must be one of mla, gqa"),
       (dict(score_func="x"), "score_func='x' is not allowed: score_func must be one of sigmoid, softmax"),
       (dict(vocab_size=0), "vocab_size=0 is not allowed"), (dict(dropout=1.0), "dropout=1.0 is not allowed"),
       (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 is not allowed"), (dict(norm_eps=0.0), "norm_eps=0.0"),
       (dict(route_scale=float("nan")), "route_scale=nan is not allowed"),
       (dict(n_head=4, n_kv_head=3), "n_kv_head=3 is not allowed: n_kv_head must be a divisor of n_head=4"),
       (dict(kv_lora_rank=0), "kv_lora_rank=0 is not allowed"),
       (dict(attn="gqa", n_head=4, n_embd=36), "n_embd=36 is not allowed"),
       (dict(n_routed_experts=6, n_expert_groups=4), "n_expert_groups=4 is not allowed"),
       (dict(n_expert_groups=2, n_limited_groups=3), "n_limited_groups=3 is not allowed"),
       (dict(n_routed_experts=4, n_activated_experts=5), "n_activated_experts=5 is not allowed"),
       (dict(n_layer=2, moe_layers=[1, 2]), "moe_layers=[1, 2] is not allowed")]


@pytest.mark.parametrize("kw, says", BAD, ids=[str(kw) for kw, _ in BAD])
def test_model_config_refuses_a_bad_value_in_one_line_naming_the_key(kw, says):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kw)
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_model_config_takes_every_listed_choice_and_mtp_layers_in_moe_layers():
    for attn in ATTENTION_KINDS:
        for score in SCORE_FUNCS:
            ModelConfig(attn=attn, score_func=score)
    assert ModelConfig(n_layer=2, mtp_depth=1, moe_layers=[1, 2]).is_moe(2)  # the MTP module, as import writes it


# train.py's vocab_size 0 is the dataset's, and nan is not a value its command line can write
TRAIN_BAD = [(kw, says) for kw, says in BAD if not {"vocab_size", "route_scale"} & set(kw)]


@pytest.mark.parametrize("kw, says", TRAIN_BAD, ids=[str(kw) for kw, _ in TRAIN_BAD])
def test_train_py_refuses_what_model_config_refuses_with_the_same_line(kw, says, capsys, tmp_path):
    args = [f"--{k}={v}" for k, v in kw.items()] + ["--dataset=none", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as e:  # refused before any work: no dataset needed, no out_dir made
        train.train(*configure(train.DEFAULTS, args, rules=train.RULES))
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {says}")
    assert not (tmp_path / "out").exists()


def test_convert_import_refuses_a_bad_model_key_before_reading_anything(tmp_path, capsys):
    err = script_error(capsys, convert.main, "import", f"--from={tmp_path}", f"--to={tmp_path / 'out'}", "--upcycle",
                       "--n_activated_experts=0")
    assert err.startswith("error: n_activated_experts=0 is not allowed")


def test_convert_export_refuses_a_router_no_transformers_class_computes(capsys):
    cfg = ModelConfig(n_layer=2, n_routed_experts=4)
    for score in SCORE_FUNCS:
        convert.hf_architecture(dataclasses.replace(cfg, score_func=score))
    cfg.score_func = "sqrtsoftplus"  # a router a later model.py may add: export must not write it as sigmoid's
    with pytest.raises(SystemExit) as e:
        convert.hf_architecture(cfg)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: score_func='sqrtsoftplus': ")
