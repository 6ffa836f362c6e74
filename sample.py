"""
Sample from a trained model, streaming the text to stdout as it is generated:

    python sample.py --out_dir=out-shakespeare-moe --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0      # greedy, prompt read from a file

The checkpoint is out_dir/best.pt where it exists, else out_dir/ckpt.pt, or --ckpt=PATH. The tokenizer is
the one the model was trained with: the checkpoint's "meta", else data/DATASET/meta.json of its dataset.
Generation uses the KV cache (for MLA the compressed latent c_KV and the shared rope key, attended in
absorbed form). The context is the model's block_size: a longer prompt keeps its last block_size tokens
(with a warning), and generation past the context slides the window (model.generate: when the cache is
full, the last half block is re-encoded at positions 0.. and decoding goes on). A model configured with
block_size > original_seq_len already covers its block_size with YaRN; the window slides beyond that.
Tokens/s and the cache size go to stderr (--quiet: nothing but the text).
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

from configurator import fail
from model import ModelConfig, Transformer
from tokenizer import get_tokenizer
from train import read_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_checkpoint(out_dir, ckpt=""):
    """--ckpt if given, else out_dir/best.pt where it exists, else out_dir/ckpt.pt."""
    if ckpt:
        if not os.path.isfile(ckpt):
            fail(f"no checkpoint at {ckpt} (--ckpt): pass the path of a .pt file that train.py wrote")
        return ckpt
    for name in ("best.pt", "ckpt.pt"):
        if os.path.isfile(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    fail(f"no checkpoint: looked for {os.path.join(out_dir, 'best.pt')} and {os.path.join(out_dir, 'ckpt.pt')}; "
         f"train one with `python prepare.py shakespeare && python train.py config/shakespeare_moe.py`, "
         f"or pass --out_dir=DIR or --ckpt=PATH")


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict) from a checkpoint train.py (or convert.py) wrote."""
    ckpt = read_checkpoint(path, ("model_args", "model"), "use another checkpoint or train again")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(ckpt["model_args"]) - known)
    if unknown:
        fail(f"{path} was written by another model.py: unknown model_args {', '.join(unknown)}")
    try:
        model = Transformer(ModelConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (AssertionError, RuntimeError) as e:
        fail(f"{path} does not fit model.py: {str(e).splitlines()[0][:200]}")
    return model.to(device).eval(), ckpt


def find_meta(ckpt):
    """(tokenizer description or None, where it was looked for): the checkpoint's "meta", else the
    meta.json prepare.py wrote for its dataset (data_dir/DATASET/, data_dir relative to this folder, as in train.py)."""
    if ckpt.get("meta"):
        return ckpt["meta"], "the checkpoint"
    config = ckpt.get("config") or {}
    dataset = config.get("dataset")
    meta_path = os.path.join(ROOT, config.get("data_dir", "data"), str(dataset or "DATASET"), "meta.json")
    if not dataset or not os.path.isfile(meta_path):
        return None, meta_path
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f), meta_path


def read_prompt(start):
    """--start: the text itself, or FILE:path for the text in a file."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--start=FILE:{path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})")


def encode_prompt(tok, meta, text, block_size):
    """Token ids of the prompt, at most block_size of them (the last ones, with a warning even if --quiet)."""
    if meta.get("tokenizer") == "char":
        missing = list(dict.fromkeys(c for c in text if c not in meta["chars"]))  # in order of appearance
        if missing:
            fail(f"the prompt has characters outside this model's {len(meta['chars'])}-character vocabulary: "
                 f"{' '.join(repr(c) for c in missing)}; remove or replace them")
    ids = tok.encode(text)
    if not ids:
        if tok.eot is None:
            fail("the prompt is empty: give some text with --start")
        ids = [tok.eot]  # start a fresh document
    if len(ids) > block_size:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {block_size}: "
              f"cropped to its last {block_size} tokens", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def stream(model, tok, ids, max_new_tokens, write, ctx=nullcontext(), **sampling):
    """Generate max_new_tokens after ids, write()-ing the decoded text as each token arrives. Text that ends
    in half a character (a byte-level BPE token split a UTF-8 sequence) waits for the rest. Returns the new tokens."""
    new, shown = [], 0
    with ctx:
        for token in model.stream(torch.tensor([ids], device=model.head.weight.device), max_new_tokens, **sampling):
            new.append(token.item())
            text = tok.decode(new)
            if len(new) < max_new_tokens:
                text = text.rstrip("\ufffd")
            write(text[shown:])
            shown = len(text)
    return new


def parse_args(argv):
    def flag(s):
        if s.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
        return s.lower() in ("true", "1")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda msg: fail(f"{msg} (see python sample.py --help)")
    p.add_argument("--out_dir", default="out-shakespeare-moe", help="the training run to sample from")
    p.add_argument("--ckpt", default="", help="a checkpoint file; overrides --out_dir")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=1, help="samples to draw, one after another")
    p.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; below 1 sharper, above 1 flatter")
    p.add_argument("--top_k", type=int, default=200, help="sample among the top_k most likely tokens; 0 = all")
    p.add_argument("--top_p", type=float, default=1.0, help="sample among the fewest tokens with this much probability")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    p.add_argument("--device", default="", help="'' = cuda, else mps, else cpu; or e.g. cuda:1")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="autocast dtype; auto = bfloat16 on GPUs that have it, else float16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", type=flag, nargs="?", const=True, default=False,
                   help="torch.compile the model (a minute or more of compiling first)")
    p.add_argument("--use_cache", type=flag, nargs="?", const=True, default=True,
                   help="False: recompute the whole context for every token")
    p.add_argument("--quiet", type=flag, nargs="?", const=True, default=False, help="nothing on stderr but errors")
    a = p.parse_args(argv)
    if a.num_samples < 1 or a.max_new_tokens < 1 or a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        fail("num_samples and max_new_tokens must be at least 1, temperature and top_k at least 0, top_p in (0, 1]")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, file=sys.stderr, flush=True))
    device = a.device or ("cuda" if torch.cuda.is_available() else
                          "mps" if torch.backends.mps.is_available() else "cpu")
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        fail(f"--device={device}, but this torch sees no CUDA GPU; use --device=cpu")
    dtype = a.dtype if a.dtype != "auto" else "float32" if device_type != "cuda" else (
        "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    path = find_checkpoint(a.out_dir, a.ckpt)
    model, ckpt = load_checkpoint(path, device)
    meta, where = find_meta(ckpt)
    if meta is None:
        fail(f"{path} names no tokenizer: it has no meta, and {where} does not exist; run "
             f"`python prepare.py {ckpt.get('config', {}).get('dataset') or 'DATASET'}` to make it")
    try:
        tok = get_tokenizer(meta)
    except (ValueError, OSError, ImportError) as e:
        fail(f"cannot build the tokenizer of {path} ({meta.get('tokenizer')!r}): {e}")
    say(f"{path} (iter {ckpt.get('iter_num', '?')}), {model.num_params() / 1e6:.2f}M parameters, "
        f"tokenizer {meta.get('tokenizer')}, {device} {dtype}")
    ids = encode_prompt(tok, meta, read_prompt(a.start), model.cfg.block_size)
    if a.compile:
        model.compile()  # in place: generate's calls of model(...) run compiled
    torch.manual_seed(a.seed)
    sampling = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, use_cache=a.use_cache)
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())
    n_tokens, seconds = 0, 0.0
    for k in range(a.num_samples):
        if k:
            write("\n---------------\n")
        write(tok.decode(ids))
        t0 = time.perf_counter()
        n_tokens += len(stream(model, tok, ids, a.max_new_tokens, write, ctx, **sampling))
        seconds += time.perf_counter() - t0
    write("\n")
    cache = model.cache_bytes_per_token(getattr(torch, dtype))
    say(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s (with decoding and printing); "
        f"KV cache {cache:,} bytes/token, {cache * model.cfg.block_size / 2**20:.2f} MiB for the "
        f"{model.cfg.block_size}-token context" if a.use_cache else "no KV cache (--use_cache=False)")


if __name__ == "__main__":
    main()
