"""
Self-speculative decoding against plain cached decoding, for bench.py's `generate` section:

    python bench.py --only=generate

Acceptance depends on trained weights, so this times trained checkpoints with MTP modules (mtp_depth >= 1):
out-shakespeare-mtp (config/shakespeare_mtp.py: 24 layers, where drafting can pay), out-shakespeare-char-moe and
out-shakespeare-moe trained with --mtp_depth=1; one missing is skipped with the command that trains it. Each
comparison runs the decoders in turn (plain, speculative, plain, ...) on one prompt and reports medians; batch 1,
float32, greedy and at temperature 0.8 (top-k 200, as sample.py), speculative with the default drafts a step (2 for
one module, chained: generate.drafts_per_step) and with one; then greedy at growing batch sizes,
one prompt per row, each row keeping its own drafts (generate.Decoder). For the 24-layer model, the serving
engine (engine.py) with 1, 4 and 8 clients, plain and with speculative=True (drafting while it pays), in turn.
"""
import os
import statistics
import threading
import time

import torch

from checkpoint import find_checkpoint, load_model, load_tokenizer
from engine import Engine, Sequence, engine_threads
from generate import Sampling, drafts_per_step, stream

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = {"mtp": "out-shakespeare-mtp", "char": "out-shakespeare-char-moe", "bpe": "out-shakespeare-moe"}
TRAIN = {"mtp": "python train.py config/shakespeare_mtp.py --max_time=2400",  # about 40 minutes on 2 cores
         "char": "python train.py config/shakespeare_char_moe.py --mtp_depth=1 --max_iters=2000",
         "bpe": "python train.py config/shakespeare_moe.py --mtp_depth=1"}
SERVED = ("mtp",)  # the checkpoints the engine's rows time
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


def timed(model, idx, n, reps, modes, **sampling):
    """Tokens/s of decoding n tokens after idx in each of the modes {name: stream() options} (the first plain),
    run in turn reps times after a warm-up each. -> ({mode: tok/s}, {mode: median per-round speed-up over the
    first}, {mode: drafts accepted / drafted})."""
    seconds = {mode: [] for mode in modes}
    speculation = {mode: {"drafted": 0, "accepted": 0} for mode in modes}
    for rep in range(reps + 1):
        for mode, options in modes.items():
            torch.manual_seed(rep)
            t = time.perf_counter()
            for _ in stream(model, idx, n, speculation=speculation[mode], **options, **sampling):
                pass
            if rep:  # round 0 warms up
                seconds[mode].append(time.perf_counter() - t)
    plain = seconds[next(iter(modes))]
    return ({k: idx.size(0) * n / statistics.median(v) for k, v in seconds.items()},
            {k: statistics.median(a / b for a, b in zip(plain, v)) for k, v in seconds.items()},
            {k: c["accepted"] / max(1, c["drafted"]) for k, c in speculation.items()})


def bench_generate_speculative(quick, checkpoints=CHECKPOINTS):
    """Rows (name, value, unit, extra dict): tokens/s without and with speculative decoding, the speed-up and
    the acceptance rate, per model, length and temperature; then the greedy speed-up by batch size; then the
    engine's rows (engine_rows)."""
    rows, reps = [], 3 if quick else 5
    for name, where in checkpoints.items():
        path = find_checkpoint(os.path.join(ROOT, where))
        if path is None:
            rows.append((f"{name}: skipped, no checkpoint in {where} (train it: {TRAIN.get(name, '')})", "-", "", {}))
            continue
        model, ckpt = load_model(path)
        if not model.cfg.mtp_depth:
            rows.append((f"{name}: skipped, {path} has no MTP modules (train with --mtp_depth=1)", "-", "", {}))
            continue
        tok, _ = load_tokenizer(path, ckpt)
        idx = prompts(tok, 1)
        speculative, drafts = dict(speculative=True), drafts_per_step(model.cfg)
        info = dict(checkpoint=path, iter=ckpt.get("iter_num"), mtp_depth=model.cfg.mtp_depth, prompt=idx.size(1),
                    block_size=model.cfg.block_size, threads=torch.get_num_threads(), dtype="float32", drafts=drafts)
        modes = {"plain": {}, f"speculative, {drafts} drafts a step": speculative}
        if drafts > 1:  # what chaining buys
            modes["speculative, 1 draft a step"] = dict(speculative=True, drafts=1)
        for n in [256] if quick else [256, 1024]:
            for temperature in (0.0, 0.8):
                what = f"{name}: {n} new tokens, {'greedy' if temperature == 0 else f'temperature {temperature}'}"
                speed, speedup, rate = timed(model, idx, n, reps, modes, temperature=temperature, top_k=200)
                rows.append((f"{what}, plain", speed["plain"], "tok/s", info))
                for mode in list(modes)[1:]:
                    extra = dict(info, acceptance=round(rate[mode], 3))
                    rows += [(f"{what}, {mode}", speed[mode], "tok/s", extra),
                             (f"{what}, {mode}: speed-up (acceptance {rate[mode]:.0%})", speedup[mode], "x", extra)]
        for batch in [1, 4] if quick else [1, 2, 4, 8, 16]:
            speed, speedup, rate = timed(model, prompts(tok, batch), 128, reps, dict(plain={}, speculative=speculative),
                                         temperature=0.0)
            extra = dict(info, batch=batch, acceptance=round(rate["speculative"], 3),
                         **{f"{k} tok/s": v for k, v in speed.items()})
            rows.append((f"{name}: greedy, 128 new tokens, batch {batch}: speculative speed-up (acceptance "
                         f"{rate['speculative']:.0%})", speedup["speculative"], "x", extra))
        if name in SERVED:
            rows += engine_rows(name, model, tok, info, reps, [1, 4] if quick else [1, 4, 8], 64 if quick else 128)
    return rows


def served(model, tok, clients, rounds, n, speculative):
    """The serving engine with `clients` rows busy: clients * rounds greedy completions of n tokens of different
    prompts, submitted at once to an engine of `clients` rows (each joins as another ends). -> (tokens/s, the
    completions' tokens, the engine's drafting counts, the share of its steps that drafted)."""
    engine = Engine(model, tok, max_batch=clients, max_queue=clients * rounds, speculative=speculative,
                    threads=engine_threads())  # serve.py's default
    done = threading.Semaphore(0)
    seqs = [Sequence(ids, n, lambda chunk: (chunk.finish_reason or chunk.error) and done.release(),
                     Sampling(temperature=0)) for ids in prompts(tok, clients * rounds).tolist()]
    t = time.perf_counter()
    engine.submit(seqs)
    for _ in seqs:
        done.acquire()
    seconds = time.perf_counter() - t
    engine.close()
    steps = engine.policy.steps_taken if engine.policy else {}
    return (sum(len(s.tokens) for s in seqs) / seconds, [s.tokens for s in seqs], dict(engine.drafting),
            steps.get(True, 0) / max(1, sum(steps.values())))


def engine_rows(name, model, tok, info, reps, clients, n, rounds=3):
    """Rows: the engine's tokens/s plain and speculative, in turn, for each number of clients; the median of the
    per-round ratios (goal: none below 0.95x), acceptance, the share of steps that drafted, and whether the
    greedy text was the same. Each run is a fresh engine, whose drafting policy measures from scratch."""
    rows = []
    for c in clients:
        rates, ratios, same, counts, drafting = {False: [], True: []}, [], True, {"drafted": 0, "accepted": 0}, []
        for rep in range(reps + 1):
            results = {mode: served(model, tok, c, rounds, n, mode) for mode in (False, True)}
            same &= results[False][1] == results[True][1]
            if rep:  # round 0 warms up
                for mode, (rate, *_) in results.items():
                    rates[mode].append(rate)
                ratios.append(results[True][0] / results[False][0])
                counts = {k: counts[k] + results[True][2][k] for k in counts}
                drafting.append(results[True][3])
        rate = counts["accepted"] / max(1, counts["drafted"])
        extra = dict(info, clients=c, rounds=rounds, new_tokens=n, acceptance=round(rate, 3), same_text=same,
                     drafting_steps=round(statistics.median(drafting), 3))
        what = f"{name}: engine, {c} client{'s' * (c > 1)}, greedy"
        rows += [(f"{what}, plain", statistics.median(rates[False]), "tok/s", extra),
                 (f"{what}, speculative", statistics.median(rates[True]), "tok/s", extra),
                 (f"{what}, speculative / plain (acceptance {rate:.0%}, {statistics.median(drafting):.0%} of steps "
                  f"drafting, text {'the same' if same else 'DIFFERENT'})", statistics.median(ratios), "x", extra)]
    return rows
