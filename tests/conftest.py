# Shared pytest set-up: plain `pytest` (not just `python -m pytest`) imports the top-level scripts
# (model, prepare, tokenizer, ...) from the repository root, and what several test modules share.
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelConfig, Transformer  # noqa: E402 (after the path is set)

CHARS = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}
BLOCK = 48


def save_model(path, attn="mla", meta=META, prefix="", config=None):
    """A tiny random char-level checkpoint as train.py writes them. Weights are scaled up from the init so
    that greedy text varies for a while instead of repeating one character."""
    cfg = ModelConfig(vocab_size=len(CHARS), block_size=BLOCK, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attn=attn,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                      n_dense_layers=1, inter_dim=64, moe_inter_dim=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3 if p.dim() > 1 else 1)
    ckpt = dict(model_args=dataclasses.asdict(cfg), model={prefix + k: v for k, v in model.state_dict().items()},
                iter_num=7, config=config or {"dataset": "tiny_chars"}, **({"meta": meta} if meta else {}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and several threads crawl on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script_error(capsys, main, *argv):
    """The error line a script's main(argv) prints for bad input (after any notes), checking it exits with 2."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith("error: ")
    return err[-1]
