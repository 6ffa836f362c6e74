"""
Self-speculative decoding against plain cached decoding, for bench.py's `generate` section:

    python bench.py --only=generate

Acceptance depends on trained weights, so this times trained checkpoints with MTP modules (mtp_depth >= 1):
by default out-shakespeare-char-moe and out-shakespeare-moe, trained with --mtp_depth=1. Each comparison
runs the two decoders in turn (plain, speculative, plain, ...) on one prompt and reports medians; batch 1,
float32, greedy and at temperature 0.8 (top-k 200, as sample.py); then greedy at growing batch sizes, one
prompt per row, each row keeping its own drafts (generate.Decoder).
"""
import os
import statistics
import time

import torch

from checkpoint import find_checkpoint, load_model, load_tokenizer
from generate import stream

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = {"char": "out-shakespeare-char-moe", "bpe": "out-shakespeare-moe"}
# prompts: 16-token windows of this passage, a different one for each row of a batch
PASSAGE = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
           "That thou her maid art far more fair than she:\nBe not her maid, since she is envious;\n"
           "Her vestal livery is but sick and green\nAnd none but fools do wear it; cast it off.\n")


def prompts(tok, batch, length=16):
    """[batch, length] token ids: windows of PASSAGE spread over it, a different one per row."""
    ids = tok.encode(PASSAGE)
    step = (len(ids) - length) // max(batch - 1, 1)
    return torch.tensor([ids[b * step:b * step + length] for b in range(batch)])


def timed(model, idx, n, reps, **sampling):
    """Tokens/s of plain and speculative decoding of n tokens after idx, run in turn reps times after a warm-up
    each. -> ({"plain": tok/s, "speculative": tok/s}, median per-round speed-up, drafts accepted / drafted)."""
    seconds, speculation = {"plain": [], "speculative": []}, {"drafted": 0, "accepted": 0}
    for rep in range(reps + 1):
        for mode in seconds:
            torch.manual_seed(rep)
            t = time.perf_counter()
            for _ in stream(model, idx, n, speculative=mode == "speculative", speculation=speculation, **sampling):
                pass
            if rep:  # round 0 warms up
                seconds[mode].append(time.perf_counter() - t)
    speed = {k: idx.size(0) * n / statistics.median(v) for k, v in seconds.items()}
    return speed, statistics.median(a / b for a, b in zip(seconds["plain"], seconds["speculative"])), \
        speculation["accepted"] / speculation["drafted"]


def bench_generate_speculative(quick, checkpoints=CHECKPOINTS):
    """Rows (name, value, unit, extra dict): tokens/s without and with speculative decoding, the speed-up and
    the acceptance rate, per model, length and temperature; then the greedy speed-up by batch size."""
    rows, reps = [], 3 if quick else 5
    for name, where in checkpoints.items():
        path = find_checkpoint(os.path.join(ROOT, where))
        if path is None:
            rows.append((f"{name}: skipped, no checkpoint in {where}", "-", "", {}))
            continue
        model, ckpt = load_model(path)
        if not model.cfg.mtp_depth:
            rows.append((f"{name}: skipped, {path} has no MTP modules (train with --mtp_depth=1)", "-", "", {}))
            continue
        tok, _ = load_tokenizer(path, ckpt)
        idx = prompts(tok, 1)
        info = dict(checkpoint=path, iter=ckpt.get("iter_num"), mtp_depth=model.cfg.mtp_depth, prompt=idx.size(1),
                    block_size=model.cfg.block_size, threads=torch.get_num_threads(), dtype="float32")
        for n in [256] if quick else [256, 1024]:
            for temperature in (0.0, 0.8):
                what = f"{name}: {n} new tokens, {'greedy' if temperature == 0 else f'temperature {temperature}'}"
                speed, speedup, rate = timed(model, idx, n, reps, temperature=temperature, top_k=200)
                extra = dict(info, acceptance=round(rate, 3))
                rows += [(f"{what}, plain", speed["plain"], "tok/s", extra),
                         (f"{what}, speculative", speed["speculative"], "tok/s", extra),
                         (f"{what}, speculative speed-up (acceptance {rate:.0%})", speedup, "x", extra)]
        for batch in [1, 4] if quick else [1, 2, 4, 8, 16]:
            speed, speedup, rate = timed(model, prompts(tok, batch), 128, reps, temperature=0.0)
            extra = dict(info, batch=batch, acceptance=round(rate, 3), **{f"{k} tok/s": v for k, v in speed.items()})
            rows.append((f"{name}: greedy, 128 new tokens, batch {batch}: speculative speed-up (acceptance {rate:.0%})",
                         speedup, "x", extra))
    return rows

