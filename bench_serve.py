"""
What serving costs: serve.py in this process on the char MoE model (out-shakespeare-char-moe's checkpoint, else
a random model of config/shakespeare_char_moe.py's shape with a 384-token context, so that a 256-token prompt
fits), driven over HTTP by 1, 4 and 8 concurrent streaming clients (and 64 on a GPU):

    python bench.py --only=serve [--quick]

bench_serve() returns (name, value, unit) rows: one greedy streaming client's tokens/s beside sample.py's decoding
(generate.stream, what sample.py runs) of the same 128 greedy tokens after the same 16-token prompt, prefill
included in both, with the same weights (a copy, which keeps its own caches while the engine holds the model's)
and the same dtype, each at the CPU threads its script sets (sample.py torch's default, serve.py one fewer:
serve.engine_threads), and their ratio; aggregate generated tokens/s of 1, 4 and 8 sampling clients and its ratio
to one client's; the p50 and p99 time per output token (the gaps between a stream's tokens) under 8 (and 64)
clients; time to first token for a 16- and a 256-token prompt alone. Each round runs everything compared in
turn, after a first round that warms up; ratios are medians of the rounds' ratios, so that they hold on a
shared machine. Random weights decode at the speed of trained ones: the work per token does not depend on the
values (--quick: 32 tokens, fewer rounds). bench_serve(speculative=True) serves with speculative decoding
instead, which needs the trained checkpoint with MTP modules (acceptance depends on the weights), and adds the
share of drafts accepted; clients=(1, 4) picks the numbers of clients. Plain against speculative serving at 1
and 4 clients:

    python -c "import bench_serve as b; [print(s, *r) for s in (False, True) for r in b.bench_serve(speculative=s, clients=(1, 4))]"
"""
import copy
import dataclasses
import http.client
import json
import operator
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
        "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 4


def char_moe():
    """(model, tokenizer meta, what it is): the trained char MoE where there is one, else a random one."""
    from checkpoint import find_checkpoint, load_model, load_tokenizer
    from model import ModelConfig, Transformer
    path = find_checkpoint(os.path.join(ROOT, 'out-shakespeare-char-moe'))
    if path:
        model, ckpt = load_model(path)
        return model, load_tokenizer(path, ckpt)[1], path
    config = {'__file__': os.path.join(ROOT, 'config', 'shakespeare_char_moe.py')}
    with open(config['__file__']) as f:
        exec(f.read(), config)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in config.items() if k in fields} | dict(vocab_size=len(CHARS), block_size=384))
    torch.manual_seed(0)
    return Transformer(cfg).eval(), {'tokenizer': 'char', 'chars': CHARS}, 'random weights, context 384'


def stream(url, prompt, max_tokens, seed, temperature=0.8):
    """One streamed completion: (seconds from the request to each chunk of text, tokens generated)."""
    conn = http.client.HTTPConnection(*url.removeprefix('http://').split(':'), timeout=600)
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, stream=True,
                stream_options={'include_usage': True})
    t0 = time.perf_counter()
    conn.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
    times, tokens = [], 0
    for line in conn.getresponse():
        if line.startswith(b'data: {') and b'"usage"' in line:
            tokens = json.loads(line[6:])['usage']['completion_tokens']
        elif line.startswith(b'data: {'):  # parse no more than that here: the clients share the server's cores
            times.append(time.perf_counter() - t0)
    conn.close()
    return times, tokens


def decode_rate(model, ids, n, ctx):
    """sample.py's decoding speed: tokens/s of generate.stream (the decoder sample.py runs) over n greedy tokens
    after the prompt ids, prefill included, with its cache."""
    from generate import stream as decode
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        for _ in decode(model, torch.tensor([ids], device=model.head.weight.device), n, temperature=0):
            pass
    return n / (time.perf_counter() - t0)


def bench_serve(quick=False, speculative=False, clients=None):
    import serve
    from checkpoint import require_drafts
    from common import autocast, pick_device, pick_dtype
    from tokenizer import get_tokenizer
    device = pick_device()
    dtype = pick_dtype('auto', device)
    model, meta, what = char_moe()
    if speculative:
        require_drafts(model, f"the char MoE ({what})", 'serve')
    model.to(device)
    twin = copy.deepcopy(model)  # sample.py's decoding, with its own caches, while the engine holds the model's
    clients = clients or [1, 4, 8] + ([64] if device.startswith('cuda') else [])
    context, tok = model.cfg.block_size, get_tokenizer(meta)
    new, each = (32, 1) if quick else (128, 2)  # tokens per completion (the engine slides), completions per client
    app = serve.create_app(model, tok, meta, 'char-moe', max_batch=max(clients), max_queue=64,
                           ctx=lambda: autocast(device, dtype), speculative=speculative)
    url, stop = serve.start_in_thread(app)
    threads = {'sample.py': torch.get_num_threads(), 'serve.py': serve.engine_threads(torch.get_num_threads())}
    print(f"serve bench: char MoE ({what}), {device} {dtype}{', speculative' if speculative else ''}, CPU threads as "
          f"each script sets them: sample.py {threads['sample.py']}, serve.py {threads['serve.py']}", file=sys.stderr)
    prompt = tok.encode(TEXT[:16])
    decoded, served, rate, results = [], [], {n: [] for n in clients}, {n: [] for n in clients}
    try:
        for _ in range(3 if quick else 4):  # everything compared, in turn, each round; the first round warms up
            torch.set_num_threads(threads['sample.py'])
            decoded.append(decode_rate(twin, prompt, new, autocast(device, dtype)))
            torch.set_num_threads(threads['serve.py'])
            t0 = time.perf_counter()
            served.append(stream(url, TEXT[:16], new, 0, temperature=0)[1] / (time.perf_counter() - t0))
            for n in clients:  # each client streams `each` sampled completions one after another
                t0 = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    done = sum(pool.map(lambda i: [stream(url, TEXT[i % 50:i % 50 + 16], new, i * each + r)
                                                   for r in range(each)], range(n)), [])
                rate[n].append(sum(tokens for _, tokens in done) / (time.perf_counter() - t0))
                results[n].append(done)
        decoded, served = decoded[1:], served[1:]
        rate, results = {n: r[1:] for n, r in rate.items()}, {n: sum(r[1:], []) for n, r in results.items()}
        rows = [("sample.py decode tokens/s, greedy", statistics.median(decoded), 'tokens/s'),
                ("one streaming client tokens/s, greedy", statistics.median(served), 'tokens/s'),
                ("one client / sample.py decode", statistics.median(map(operator.truediv, served, decoded)), 'x')]
        for n in clients:
            rows.append((f"aggregate tokens/s, {n} streaming clients", statistics.median(rate[n]), 'tokens/s'))
            if n > 1:
                rows.append((f"aggregate tokens/s, {n} clients / 1 client",
                             statistics.median(map(operator.truediv, rate[n], rate[1])), 'x'))
            if n >= 8:
                gaps = sorted(b - a for times, _ in results[n] for a, b in zip(times, times[1:]))
                rows.append((f"time per output token, {n} clients, p50", 1e3 * gaps[len(gaps) // 2], 'ms'))
                rows.append((f"time per output token, {n} clients, p99", 1e3 * gaps[int(len(gaps) * 0.99)], 'ms'))
        for length in (16, 256):
            text = TEXT[:min(length, context)]  # a char model: one token per character
            first = statistics.median(stream(url, text, 1, 0)[0][0] for _ in range(3 if quick else 7))
            rows.append((f"time to first token, {len(text)}-token prompt, alone", 1e3 * first, 'ms'))
    finally:
        stop()
        torch.set_num_threads(threads['sample.py'])
    if speculative:
        counts = app.state.engine.drafting
        rows.append(("speculative: drafts accepted", counts['accepted'] / max(counts['drafted'], 1), 'share'))
    return rows
