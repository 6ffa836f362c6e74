"""
What serving costs: serve.py, run as a user runs it (a process of its own, its default CPU threads), on the char
MoE model (out-shakespeare-char-moe's checkpoint, else a random model of config/shakespeare_char_moe.py's shape
with a 384-token context, so that a 256-token prompt fits, saved as a checkpoint for the run), driven over HTTP
by 1, 4 and 8 concurrent streaming clients (and 64 on a GPU) from this process:

    python bench.py --only=serve [--quick]

bench_serve() returns (name, value, unit) rows: one greedy streaming client's tokens/s beside sample.py's decoding
(generate.stream, what sample.py runs, in a fresh process of its own at torch's default threads, as sample.py
runs) of the same 128 greedy tokens after the same 16-token prompt, prefill included in both, same checkpoint,
same dtype, and their ratio; aggregate generated tokens/s of 1, 4 and 8 sampling clients and its ratio to one
client's; the p50 and p99 time per output token (the gaps between a stream's tokens) under 8 (and 64) clients;
the engine alone (in a process of its own, no HTTP: 8 sampled sequences submitted together against one), which
says how much of the 8-client ratio the batching gives and how much the HTTP side costs; time to first token for
a 16- and a 256-token prompt alone. Each round runs everything compared in turn, after a first round that warms
up; ratios are medians of the rounds' ratios, so that they hold on a shared machine.
Random weights decode at the speed of trained ones: the work per token does not depend on the values (--quick:
32 tokens, fewer rounds). bench_serve(speculative=True) serves with --speculative instead, which needs the
trained checkpoint with MTP modules (acceptance depends on the weights), and adds the share of drafts accepted
(from GET /health); clients=(1, 4) picks the numbers of clients. Plain against speculative serving at 1 and 4
clients:

    python -c "import bench_serve as b; [print(s, *r) for s in (False, True) for r in b.bench_serve(speculative=s, clients=(1, 4))]"
"""
import dataclasses
import http.client
import json
import operator
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
        "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 4


def char_moe(work):
    """(checkpoint path, what it is): the trained char MoE where there is one, else a random one saved in work."""
    from checkpoint import find_checkpoint
    from model import ModelConfig, Transformer
    path = find_checkpoint(os.path.join(ROOT, 'out-shakespeare-char-moe'))
    if path:
        return path, path
    config = {'__file__': os.path.join(ROOT, 'config', 'shakespeare_char_moe.py')}
    with open(config['__file__']) as f:
        exec(f.read(), config)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in config.items() if k in fields} | dict(vocab_size=len(CHARS), block_size=384))
    torch.manual_seed(0)
    path = os.path.join(work, 'ckpt.pt')
    torch.save(dict(model_args=dataclasses.asdict(cfg), model=Transformer(cfg).state_dict(), iter_num=0,
                    config={}, meta={'tokenizer': 'char', 'chars': CHARS}), path)
    return path, 'random weights, context 384'


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


def loaded(path, dtype):
    """The checkpoint's model and tokenizer on the device sample.py and serve.py pick, and the dtype they decode in
    for --dtype=dtype: (model, tokenizer, device, dtype)."""
    from checkpoint import load_model, load_tokenizer
    from common import pick_device, pick_dtype
    from tokenizer import get_tokenizer
    device = pick_device()
    model, ckpt = load_model(path, device)
    return model, get_tokenizer(load_tokenizer(path, ckpt)[1]), device, pick_dtype(dtype, device, decoding=True)


def decode_rate(path, prompt, n, dtype='auto'):
    """sample.py's decoding speed, in this process (a fresh one, at torch's default threads): tokens/s of
    generate.stream (the decoder sample.py runs) over n greedy tokens after the prompt text, prefill included,
    with its cache, after one such decoding that warms up."""
    from common import autocast
    from generate import stream as decode
    model, tok, device, dtype = loaded(path, dtype)
    ids = torch.tensor([tok.encode(prompt)], device=device)
    with torch.no_grad(), autocast(device, dtype):
        for _ in range(2):
            t0 = time.perf_counter()
            for _ in decode(model, ids, n, temperature=0):
                pass
    return n / (time.perf_counter() - t0)


def engine_batching(path, n, dtype='auto'):
    """What serve.py's engine makes without HTTP, in this process (a fresh one, at serve.py's engine threads):
    aggregate tokens/s of 8 sampled sequences of n tokens submitted together (the clients' prompts and seeds)
    over one's, prefill included, each after one such round that warms up."""
    from common import autocast
    from engine import Engine, Sequence, engine_threads
    from generate import Sampling
    model, tok, device, dtype = loaded(path, dtype)
    engine = Engine(model, tok, max_batch=8, ctx=lambda: autocast(device, dtype), threads=engine_threads())
    rate = {}
    for rows in (1, 1, 8, 8):
        ended = threading.Semaphore(0)
        t0 = time.perf_counter()
        engine.submit([Sequence(tok.encode(TEXT[i % 50:i % 50 + 16]), n, lambda c: c.finish_reason and ended.release(),
                                Sampling(temperature=0.8), seed=i) for i in range(rows)])
        for _ in range(rows):
            ended.acquire()
        rate[rows] = rows * n / (time.perf_counter() - t0)
    engine.close()
    return rate[8] / rate[1]


def in_process(function, *args):
    """function(*args), a function of this module, in a fresh process: a float."""
    code = f"import bench_serve as b; print(b.{function}{args!r})"
    return float(subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout)


def start_server(path, log, *options):
    """serve.py on path in a process of its own, on a free port: (its base URL, the process)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, 'serve.py', f'--ckpt={path}', f'--port={port}', *options], cwd=ROOT,
                              stderr=log)
    while 'serving' not in open(log.name).read():
        if server.poll() is not None:
            raise RuntimeError(f"serve.py exited: {open(log.name).read()[-2000:]}")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def bench_serve(quick=False, speculative=False, clients=None, dtype='auto'):
    from common import pick_device
    device = pick_device()
    clients = clients or [1, 4, 8] + ([64] if device.startswith('cuda') else [])
    new, each = (32, 1) if quick else (128, 2)  # tokens per completion (the engine slides), completions per client
    with tempfile.TemporaryDirectory() as work, open(os.path.join(work, 'serve.log'), 'w') as log:
        path, what = char_moe(work)
        options = [f'--max_batch={max(clients)}', '--max_queue=64', f'--dtype={dtype}',
                   *(['--speculative=True'] if speculative else [])]
        url, server = start_server(path, log, *options)  # its line says the device and dtype it serves in
        print(f"serve bench: char MoE ({what}){', speculative' if speculative else ''}; "
              f"{open(log.name).read().strip()}", file=sys.stderr)
        decoded, served, rate, results = [], [], {n: [] for n in clients}, {n: [] for n in clients}
        alone = []  # the engine's 8 rows / 1, without HTTP
        try:
            for _ in range(3 if quick else 4):  # everything compared, in turn, each round; the first round warms up
                decoded.append(in_process('decode_rate', path, TEXT[:16], new, dtype))
                if 8 in clients:
                    alone.append(in_process('engine_batching', path, new, dtype))
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
            alone = alone[1:]
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
            if alone:  # what the engine's batching gives without the HTTP side sharing its cores
                rows.append(("engine alone (no HTTP), 8 sequences submitted together / 1", statistics.median(alone),
                             'x'))
            context = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['model_args']['block_size']
            for length in (16, 256):
                text = TEXT[:min(length, context)]  # a char model: one token per character
                first = statistics.median(stream(url, text, 1, 0)[0][0] for _ in range(3 if quick else 7))
                rows.append((f"time to first token, {len(text)}-token prompt, alone", 1e3 * first, 'ms'))
            if speculative:
                conn = http.client.HTTPConnection(*url.removeprefix('http://').split(':'))
                conn.request('GET', '/health')
                counts = json.loads(conn.getresponse().read())['speculative']
                rows.append(("speculative: drafts accepted", counts['accepted'] / max(counts['drafted'], 1), 'share'))
        finally:
            server.terminate()
            server.wait()
    return rows
