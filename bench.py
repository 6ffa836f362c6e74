"""
What the model costs and what it buys, each figure measured beside its comparison in the same run:

    python bench.py                       # every section: a table on stdout, every figure in bench.json
    python bench.py --quick               # smaller and fewer repeats; arch runs a few iterations only
    python bench.py --only=moe,generate   # some sections
    python bench.py --only=arch --dtype=float32   # float32 stands in for a CPU without bf16

Sections (BENCHMARKS.md records their figures and goals):
  train     a training step of config/shakespeare_moe.py and shakespeare_char_moe.py against the dense model
            with the same active parameters per token: ms/iter, tokens/s and memory, eager and compiled
  loss      the BPE demo's training step with the loss over its 50k-wide vocabulary computed in chunks
            (model.vocab_cross_entropy) against F.cross_entropy on the whole float32 logits: ms/iter, the
            step's peak memory (CUDA allocator; on CPU resident memory above the step's start) and page faults
  moe       one DeepSeekMoE layer against a dense SwiGLU of the same active width, forward + backward, with
            the experts as a per-expert loop and as grouped_mm (Experts.impl)
  generate  decoding with the MLA cache against recomputing the prefix; cache bytes per token for MLA,
            multi-head and grouped-query attention; MoE decoding against the dense model; DeepSeek-V4's caches
            (shakespeare_char_v4.py) beside V3's MLA cache (shakespeare_char_moe.py): tokens/s and cache bytes
            per token; speculative decoding with the MTP module against plain decoding, alone and in the serving
            engine with 1, 4 and 8 clients (bench_speculative.py; config/shakespeare_mtp.py's checkpoint, trained
            beforehand)
  budget    train.py with --max_time=budget_time on each char config (shakespeare_char_*.py): how far the
            wall clock, from starting the process to its exit, lands from the budget
  arch      train.py for the same --max_time seconds each on shakespeare_char: the MoE config, its dense twin
            and a nanoGPT-shaped model; best val loss and its bits per byte from each run's metrics.jsonl.
            nanoGPT-shaped: its CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3 to 1e-4
            over 2000 iterations, dropout 0, tied embeddings) as model.py builds it: multi-head attention
            (gqa, n_kv_head = n_head) and a dense MLP 4x wide, but SwiGLU (3 matrices, GELU has 2), RMSNorm
            for LayerNorm, RoPE for learned positions, no biases.
  v4        DeepSeek-V4's parts against V3's at the demo's size: train.py for the same --max_time seconds each on
            shakespeare_char with shakespeare_char_v4.py and shakespeare_char_moe.py, best val loss and bits per
            byte (which wins is a finding, not a goal); then a training step of shakespeare_char_v4.py with its 4
            mHC streams against the same model with hc_mult=1 (mHC's extra cost per step) and against the V3 MoE's
  mfu       model FLOPs utilisation on CUDA (bf16, compiled); on CPU only the code path runs, at a toy size
  prepare   prepare.py tokens/s and peak memory: GPT-2 BPE on Tiny Shakespeare and a synthetic corpus
  serve     serve.py's engine under 1, 4 and 8 concurrent streaming clients (bench_serve.py)
  dsa       decoding at long context (1k, 4k, 16k cached tokens) with DeepSeek Sparse Attention (index_topk 256
            and 512) against dense MLA, the same weights, on a model where attention is the main cost (DSA_MODEL),
            in --dtype's autocast (auto: bf16 where the device has it); cache bytes per token of each
  dsa_quality  config/shakespeare_char_dsa.py (block 1024) trained for dsa_time seconds of wall clock twice, side
            by side, one thread each: dense MLA throughout, and V3.2's route (dense for the first half, convert.py
            add-indexers, the indexers' dense warm-up, then sparse training with index_topk 128): both val losses,
            iterations, and the indexer's KL over training from metrics.jsonl

Timings run the things compared in turn (a, b, a, b, ...) and report medians and the median of the
per-round ratios, so that a ratio holds on a shared, noisy machine. OMP_NUM_THREADS sets the threads,
here and in the train.py and prepare.py runs. Vocabulary sizes are the config's, else the dataset's meta.json.
"""
import glob
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from datetime import datetime, timezone

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import torch
import torch.nn.functional as F

import model as M
from common import DTYPES, atomic_write, autocast, cpu_has_bf16, fail, peak_flops, pick_device, pick_dtype
from configurator import at_least, configure, field_defaults, one_of, script_defaults
from generate import generate
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(ROOT, 'train.py')  # what arch, budget and dsa_quality run
CONVERT = os.path.join(ROOT, 'convert.py')  # dsa_quality: add-indexers
TRAIN_DEFAULTS = {**field_defaults(ModelConfig), 'vocab_size': 0, **script_defaults(TRAIN)}  # train.py's keys
SECTIONS = ('train', 'loss', 'moe', 'generate', 'budget', 'arch', 'v4', 'mfu', 'prepare', 'serve', 'dsa', 'dsa_quality')
# -----------------------------------------------------------------------------
quick = False  # smaller sizes and fewer repeats
only = ''  # comma-separated sections (train, loss, moe, generate, budget, arch, v4, mfu, prepare, serve, dsa, dsa_quality); '' = all
out = 'bench.json'  # where the figures go, with the command, machine and date
device = ''  # '' = cuda where there is a GPU, else cpu
dtype = 'auto'  # float32, bfloat16 or float16 autocast (train, arch, dsa, dsa_quality, serve); auto: common.pick_dtype
reps = 0  # timing rounds per comparison; 0 = 3 with --quick, 7 without
max_time = 150  # arch: the wall-clock seconds each train.py run gets (the goal's budget); v4's too (the demo's: 180)
budget_time = 60  # budget: the --max_time each char config gets; 0 = 60, or 15 with --quick
dsa_time = 0  # dsa_quality: the wall-clock seconds of each arm; 0 = 600, or 40 with --quick
data_dir = 'data'  # the prepared datasets (vocabulary sizes; arch's data), relative to bench.py's folder
corpus_mb = 0  # prepare: size of the synthetic corpus in MB; 0 = 200, or 20 with --quick
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str))}
RULES = dict(only=(lambda v: set(v.split(',')) - {''} <= set(SECTIONS), f"sections among {', '.join(SECTIONS)}"),
             dtype=one_of(*DTYPES), reps=at_least(0), max_time=at_least(1), budget_time=at_least(0),
             dsa_time=at_least(0), corpus_mb=at_least(0))
RESULTS = []
NANOGPT = ['--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=64', '--batch_size=12', '--dropout=0.0',
           '--learning_rate=1e-3', '--min_lr=1e-4', '--max_iters=2000', '--lr_decay_iters=2000', '--warmup_iters=100',
           '--beta2=0.99', '--attn=gqa', '--n_kv_head=4', '--inter_dim=512', '--n_routed_experts=0',
           '--tie_embeddings=True']
ARCH = dict(moe=['config/shakespeare_char_moe.py'], dense=['config/shakespeare_char_dense.py'],
            nanogpt=['config/shakespeare_char_dense.py', *NANOGPT], v4=['config/shakespeare_char_v4.py'])
# dsa: a model whose decoding cost at long context is attention's: 2 layers, 256 wide, a narrow dense MLP, so that
# its 1.6M weights are a small part of what a step reads beside 16k cached tokens. MLA's 8 heads read a 256-dim
# latent and a 32-dim rope key per cached token, the indexer's 4 heads a 64-dim key: V3.2's proportions (128 heads
# over 512 + 64 dims against 64 heads x 128): the key is 0.22 of the latent's width, its scores a 17th of MLA's
# multiply-adds per cached token
DSA_MODEL = dict(vocab_size=256, n_layer=2, n_embd=256, n_head=8, q_lora_rank=128, kv_lora_rank=256,
                 qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=0, inter_dim=512,
                 index_n_heads=4, index_head_dim=64, original_seq_len=1 << 16)
DSA_MODEL_TEXT = "2 layers, 256 wide, MLA 8 heads over a 256 + 32-dim latent, indexer 4 heads x 64"
DSA_ROWS = 8  # rows decoding together at one position, a server's batch (serve's goal has 8 clients): weights read once
NANOGPT_VAL = 1.8857  # the goal's reference: nanoGPT's CPU recipe's val loss (1.88 in its README)


def record(section, name, value, unit, goal=None, ok=None, **extra):
    """One figure: printed at once and kept for bench.json. goal: a string, ok: met or not."""
    RESULTS.append(dict(section=section, name=name, value=value, unit=unit, goal=goal, ok=ok, **extra))
    v = f"{value:,.4g}" if isinstance(value, float) else str(value)
    met = '' if ok is None else '(met)' if ok else '(NOT met)'
    print(f"  {section:<9} {name:<60} {v:>10} {unit:<6} {goal or ''} {met}".rstrip(), flush=True)


def compare(fns, reps, dev, inner=1, warmup=True):
    """Time each of fns (a dict of callables) reps times, in turn, after one warm-up call each, on device dev.
    Returns ({name: median seconds per call}, {name: list of per-round seconds})."""
    sync = torch.cuda.synchronize if dev.startswith('cuda') else (lambda: None)
    for f in fns.values() if warmup else ():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                f()
            sync()
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}, times


def ratio(times, a, b):
    """Median over rounds of time[a] / time[b]: each round's pair ran back to back."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def configs(o, section, paths, **kw):
    """(file name, train.py's config, its ModelConfig with changes kw) for each config file. vocab_size is the
    config's, else the dataset's meta.json's; a config whose dataset is not prepared gets a 'skipped' row."""
    for path in paths:
        config = configure(TRAIN_DEFAULTS, [os.path.join(ROOT, path)])[0]
        args = {**{f.name: config[f.name] for f in fields(ModelConfig)}, **kw}
        meta = os.path.join(ROOT, o['data_dir'], config['dataset'], 'meta.json')
        if not args['vocab_size'] and not os.path.exists(meta):
            record(section, f"skipped {path}: no {meta} (python prepare.py {config['dataset']})", '-', '')
            continue
        if not args['vocab_size']:
            with open(meta) as f:
                args['vocab_size'] = json.load(f)['vocab_size']
        yield os.path.basename(path), config, ModelConfig(**args)


def dense_twin(cfg):
    """The dense model with the same active parameters per token: every routed-and-shared FFN becomes one
    SwiGLU of the active width (n_activated + n_shared) * moe_inter_dim."""
    width = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    return replace(cfg, n_routed_experts=0, inter_dim=width, moe_layers=[])


# ----------------------------------------------------------------------------- training step
def train_step(model, batch, block, dev, dt):
    """One training iteration as train.py runs it: forward, backward, fused AdamW, bias update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    raw = getattr(model, '_orig_mod', model)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, raw.cfg.vocab_size, (batch, block), generator=g).to(dev) for _ in range(2))

    def step():
        with autocast(dev, dt):
            loss = model(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.update_bias(raw.moe_counts()[0])
    return step, opt


def memory_bytes(model, step, opt, dev):
    """Peak memory of a training step: the CUDA allocator's peak, or on CPU the bytes of the weights,
    their gradients, the AdamW state and the activations autograd saves for the backward pass."""
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return 2 * sum(p.nbytes for p in model.parameters()) + state + sum(saved.values())


def bench_train(o):
    dev, dt = o['device'], pick_dtype(o['dtype'], o['device'])
    for tag, config, moe_cfg in configs(o, 'train', ['config/shakespeare_moe.py', 'config/shakespeare_char_moe.py']):
        B, T = config['batch_size'], config['block_size']
        cfgs = {'moe': moe_cfg, 'dense': dense_twin(moe_cfg)}
        for mode in ['eager'] if o['quick'] else ['eager', 'compiled']:
            steps = {}
            for name, cfg in cfgs.items():
                torch.manual_seed(0)
                model = Transformer(cfg).to(dev).train()
                if mode == 'eager':
                    step, opt = train_step(model, B, T, dev, dt)
                    kind = 'CUDA peak' if dev.startswith('cuda') else 'weights+grads+adam+saved'
                    record('train', f"{tag}: {name} memory ({kind})", memory_bytes(model, step, opt, dev) / 2**20, 'MiB',
                           active_params=model.num_params(True), total_params=model.num_params())
                else:  # inductor's on-disk cache can make a repeated compile fast
                    step, _ = train_step(torch.compile(model), B, T, dev, dt)
                    t = time.perf_counter()
                    step(), step()
                    record('train', f"{tag}: {name} compile, first 2 steps", time.perf_counter() - t, 's')
                steps[name] = step
            med, times = compare(steps, o['reps'], dev)
            for name in cfgs:
                record('train', f"{tag}: {name} {mode} ms/iter ({dt}, {B}x{T})", 1e3 * med[name], 'ms')
                record('train', f"{tag}: {name} {mode} tokens/s", B * T / med[name], 'tok/s')
            record('train', f"{tag}: moe / dense time per iter ({mode})", ratio(times, 'moe', 'dense'), 'x')


# ----------------------------------------------------------------------------- the vocabulary-wide loss
def plain_cross_entropy(x, weight, targets):
    """The loss from the whole float32 logits, as F.cross_entropy computes it: what vocab_cross_entropy replaces."""
    return F.cross_entropy(F.linear(x, weight).flatten(0, -2).float(), targets.flatten(), ignore_index=-1)


def step_memory(step, dev):
    """(peak bytes during step() above what was in use before it, minor page faults): the CUDA allocator's
    peak, or on Linux the resident set's peak (VmHWM, reset through /proc/self/clear_refs)."""
    import resource
    if dev.startswith('cuda'):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - before, 0

    def status(key):
        with open('/proc/self/status') as f:
            return 1024 * int(next(line.split()[1] for line in f if line.startswith(key)))
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    before, faults = status('VmRSS:'), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return status('VmHWM:') - before, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def bench_loss(o):
    dev, dt = o['device'], pick_dtype(o['dtype'], o['device'])
    for tag, config, cfg in configs(o, 'loss', ['config/shakespeare_moe.py']):
        B, T = config['batch_size'], config['block_size']
        torch.manual_seed(0)
        step = train_step(Transformer(cfg).to(dev).train(), B, T, dev, dt)[0]
        chunked = M.vocab_cross_entropy

        def with_loss(loss):
            def run():
                M.vocab_cross_entropy = loss
                try:
                    step()
                finally:
                    M.vocab_cross_entropy = chunked
            return run
        steps = {'plain': with_loss(plain_cross_entropy), 'chunked': with_loss(chunked)}
        for name, run in steps.items():
            run()  # warm-up: the allocator's first growth is not the step's
            peak, faults = step_memory(run, dev)
            record('loss', f"{tag}: {name} loss, step peak memory above its start", peak / 2**20, 'MiB')
            if not dev.startswith('cuda'):
                record('loss', f"{tag}: {name} loss, minor page faults per step", faults, '')
        med, times = compare(steps, o['reps'], dev)
        for name in steps:
            record('loss', f"{tag}: {name} loss ms/iter ({dt}, {B}x{T})", 1e3 * med[name], 'ms')
        record('loss', f"{tag}: plain / chunked time per iter", ratio(times, 'plain', 'chunked'), 'x', '>= 1.3x',
               ratio(times, 'plain', 'chunked') >= 1.3)


# ----------------------------------------------------------------------------- the MoE layer
def bench_moe(o):
    # the default dense width (8/3 D rounded up to 64: 384 at 128 wide, 704 at 256) split in 3 (2 routed + 1
    # shared); at 256 wide also 768 = 3 x 256, whose 256-wide experts suit grouped_mm (16-byte rows)
    dev = o['device']
    goal = {768: 1.5, 4096: 1.2} if dev == 'cpu' else {768: 1.3, 4096: 1.3}
    for N, D, inter in [(768, 128, 0), (4096, 256, 0), (4096, 256, 768)]:
        for E in (8,) if o['quick'] else (8, 16, 64):
            cfg = ModelConfig(n_embd=D, n_routed_experts=E, n_activated_experts=2, n_shared_experts=1, inter_dim=inter)
            torch.manual_seed(0)
            moe, dense = M.MoE(cfg).to(dev), M.MLP(D, cfg.inter_dim).to(dev)
            for p in [*moe.parameters(), *dense.parameters()]:
                torch.nn.init.normal_(p, std=0.02)
            x = torch.randn(1, N, D, device=dev, requires_grad=True)
            auto = 'grouped_mm' if M.grouped_mm_ok(x, D, cfg.moe_inter_dim) else 'loop'

            def fwd_bwd(layer, impl=None):
                def f():
                    if impl:
                        layer.experts.impl = impl
                    layer(x).sum().backward()
                    layer.zero_grad(set_to_none=True)
                return f
            fns = {'dense': fwd_bwd(dense), 'loop': fwd_bwd(moe, 'loop')}
            if auto == 'grouped_mm':
                fns['grouped_mm'] = fwd_bwd(moe, 'grouped_mm')
            med, times = compare(fns, o['reps'], dev, inner=3 if N < 1000 else 1)
            for impl in list(fns)[1:]:
                r, g = ratio(times, impl, 'dense'), goal[N] if impl == auto else None
                record('moe', f"{N} tok x {D} wide, {E} experts of {cfg.moe_inter_dim}: {impl} / dense", r, 'x',
                       goal=g and f"<= {g}x", ok=g and r <= g, ms=1e3 * med[impl], dense_ms=1e3 * med['dense'])


# ----------------------------------------------------------------------------- generation
def bench_generate(o):
    dev, prompt = o['device'], 16
    for tag, _, cfg in configs(o, 'generate', ['config/shakespeare_char_moe.py', 'config/shakespeare_moe.py']):
        # the char model also at 1024 new tokens; the BPE demo's recomputation mostly times its 50k-wide head
        for n in [256, 1024] if tag.startswith('shakespeare_char') and not o['quick'] else [256]:
            c = replace(cfg, block_size=prompt + n)  # the cache never slides
            torch.manual_seed(0)
            moe, dense = Transformer(c).to(dev).eval(), Transformer(dense_twin(c)).to(dev).eval()
            idx = torch.randint(0, cfg.vocab_size, (1, prompt), device=dev)
            fns = {'MoE, MLA cache': lambda: generate(moe, idx, n, temperature=0),
                   'MoE, recompute prefix': lambda: generate(moe, idx, n, temperature=0, use_cache=False),
                   'dense twin, MLA cache': lambda: generate(dense, idx, n, temperature=0)}
            med, times = compare(fns, 1 if n > 256 else max(1, o['reps'] // 2), dev, warmup=n <= 256)
            for k in fns:
                record('generate', f"{tag}: {n} new tokens, {k}", n / med[k], 'tok/s')
            r = ratio(times, 'MoE, recompute prefix', 'MoE, MLA cache')
            record('generate', f"{tag}: {n} new tokens, cache speed-up over recompute", r, 'x',
                   goal='>= 15x' if n == 1024 else None, ok=r >= 15 if n == 1024 else None)
            r = ratio(times, 'dense twin, MLA cache', 'MoE, MLA cache')
            record('generate', f"{tag}: {n} new tokens, MoE decoding speed / dense twin", r, 'x', goal='>= 0.6x',
                   ok=r >= 0.6)
    # cache bytes per token per layer, in bf16 as a decoder holds it: the same trunk with three attentions
    paths = ['config/shakespeare_moe.py', 'config/deepseek_v3_tiny.py', 'config/deepseek_smollm2.py']
    for tag, _, mla in configs(o, 'generate', paths, vocab_size=64, n_layer=1, mtp_depth=0):
        h = mla.n_head
        kv = max(d for d in range(1, h + 1) if h % d == 0 and d <= max(1, h // 3))
        per = {name: Transformer(replace(mla, **kw)).cache_bytes_per_token(torch.bfloat16)
               for name, kw in {'MLA': {}, 'MHA': dict(attn='gqa', n_kv_head=h),
                                f"GQA {kv} kv heads": dict(attn='gqa', n_kv_head=kv)}.items()}
        record('generate', f"{tag}: cache B/token/layer bf16, " + ', '.join(per), ' / '.join(map(str, per.values())), 'B')
        r = per['MHA'] / per['MLA']
        record('generate', f"{tag}: MLA cache smaller than MHA by", r, 'x', goal='>= 4x', ok=r >= 4)
    # DeepSeek-V4's caches (the window's keys, the compressors' pending tokens and entries, CSA's index keys)
    # beside V3's MLA latent cache: the char MoE and its V4 version, random weights, sliding past the 64-token block
    pair = [cfg for _, _, cfg in configs(o, 'generate', ['config/shakespeare_char_moe.py', 'config/shakespeare_char_v4.py'])]
    if len(pair) == 2:
        n = 64 if o['quick'] else 256
        torch.manual_seed(0)
        v3, v4 = (Transformer(c).to(dev).eval() for c in pair)
        idx = torch.randint(0, v3.cfg.vocab_size, (1, prompt), device=dev)
        fns = {'V3 MLA cache': lambda: generate(v3, idx, n, temperature=0),
               'V4 caches': lambda: generate(v4, idx, n, temperature=0),
               'V4 recompute': lambda: generate(v4, idx, n, temperature=0, use_cache=False)}
        med, times = compare(fns, max(1, o['reps'] // 2), dev)
        for k in fns:
            record('generate', f"char V4 and V3: {n} new tokens, {k}", n / med[k], 'tok/s')
        record('generate', f"char V4 and V3: {n} new tokens, V4 caches speed / V3 MLA cache",
               ratio(times, 'V3 MLA cache', 'V4 caches'), 'x')
        record('generate', f"char V4 and V3: {n} new tokens, V4 caches speed-up over recompute",
               ratio(times, 'V4 recompute', 'V4 caches'), 'x')
        per = [m.cache_bytes_per_token(torch.bfloat16) for m in (v3, v4)]
        record('generate', "char V4 and V3: cache B/token bf16, all layers, V3 MLA, V4", ' / '.join(f"{b:g}" for b in per), 'B')
    # self-speculative decoding with the MTP module: trained checkpoints, since acceptance depends on the weights
    from bench_speculative import bench_generate_speculative
    # goals (issue 25): the 24-layer model's greedy speed-up at batch 1, and the engine no slower with drafting
    for name, value, unit, extra in bench_generate_speculative(o['quick']):
        goal = ('>= 1.5x', 1.5) if name.startswith('mtp: ') and 'greedy, speculative speed-up' in name else \
            ('>= 0.95x', 0.95) if name.startswith('mtp: engine') and unit == 'x' else None
        record('generate', name, value, unit, **(dict(goal=goal[0], ok=value >= goal[1]) if goal else {}), **extra)


# ----------------------------------------------------------------------------- max_time: a budget that lands
def run_train(args, out_dir, env=None):
    """train.py with args in a process of its own: (its metrics.jsonl rows, wall seconds from start to exit)."""
    return finish_train(start_train(args, out_dir, env))


def start_train(args, out_dir, env=None):
    """train.py with args (env: its environment, default this one's), started in a process of its own; its output
    goes to out_dir + '.log'. -> what finish_train waits for."""
    with open(out_dir + '.log', 'w') as log:
        run = subprocess.Popen([sys.executable, TRAIN, *args, f"--out_dir={out_dir}"], cwd=ROOT, env=env, text=True,
                               stdout=log, stderr=subprocess.STDOUT)
    return run, args, out_dir, time.perf_counter()


def finish_train(started):
    """Wait for a start_train run: (its metrics.jsonl rows, wall seconds from start to exit)."""
    run, args, out_dir, t = started
    run.wait()
    wall = time.perf_counter() - t
    if run.returncode:
        with open(out_dir + '.log') as f:
            raise RuntimeError(f"train.py {shlex.join(args)} failed:\n{f.read()[-2000:]}")
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()], wall


def char_data(o, section):
    """(data_dir, source file of shakespeare_char) for a section that trains on it, or None and a 'skipped' row."""
    data = os.path.join(ROOT, o['data_dir'])
    meta = os.path.join(data, 'shakespeare_char', 'meta.json')
    if not os.path.exists(meta):
        return record(section, f"skipped: no {o['data_dir']}/shakespeare_char (python prepare.py shakespeare_char)",
                      '-', '')
    with open(meta) as f:
        return data, json.load(f).get('source')


def bench_budget(o):
    found = char_data(o, 'budget')
    if not found:
        return
    dt, budget = pick_dtype(o['dtype'], o['device']), o['budget_time'] or (15 if o['quick'] else 60)
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(glob.glob(os.path.join(ROOT, 'config', 'shakespeare_char_*.py'))):
            name = os.path.basename(path)[len('shakespeare_char_'):-len('.py')]
            args = [f"config/shakespeare_char_{name}.py", f"--data_dir={found[0]}", '--dataset=shakespeare_char',
                    f"--max_time={budget}", f"--device={o['device']}", f"--dtype={dt}"]
            rows, wall = run_train(args, os.path.join(tmp, name))
            over = 100 * (wall - budget) / budget
            with open(os.path.join(tmp, name) + '.log') as f:  # the budget's fits, to see why a run lands off
                fits = [line.strip() for line in f if line.startswith(f"max_time={budget} s")]
            record('budget', f"char {name}: --max_time={budget} ({dt}), wall clock start to exit", wall, 's',
                   iters=rows[-1]['iter'], args=args, fits=fits)
            record('budget', f"char {name}: overshoot of --max_time={budget} ({dt})", over, '%', goal='within 5%',
                   ok=abs(over) <= 5)


# ----------------------------------------------------------------------------- what the architecture buys
def train_runs(o, section, names):
    """train.py for --max_time seconds on shakespeare_char with ARCH[name]'s arguments, for each of names in turn:
    records each run's best val loss, its bits per byte and its iterations; -> {name: best val loss}, or None
    (and a 'skipped' row) without the data."""
    found = char_data(o, section)
    if not found:
        return None
    data, source = found
    dt = pick_dtype(o['dtype'], o['device'])
    # --quick: the code path only, a few iterations and no claim about the goal
    short = ['--max_iters=20', '--eval_interval=10', '--eval_iters=5', '--warmup_iters=2'] if o['quick'] else []
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            args = [*ARCH[name], f"--data_dir={data}", '--dataset=shakespeare_char', f"--max_time={o['max_time']}",
                    f"--device={o['device']}", f"--dtype={dt}", '--sample_interval=0', *short]
            rows, wall = run_train(args, os.path.join(tmp, name))
            row = min((r for r in rows if r.get('val_loss') is not None), key=lambda r: r['val_loss'])
            best[name] = row['val_loss']
            record(section, f"{name}: best val loss in {o['max_time']} s ({dt})", row['val_loss'], '', iter=row['iter'],
                   args=args, data_source=source)
            record(section, f"{name}: val bits per byte at that eval", row.get('val_bpb'), 'bpb')
            record(section, f"{name}: iterations in {wall:.0f} s wall", rows[-1]['iter'], '', wall_s=round(wall, 1))
    return best


def bench_arch(o):
    best = train_runs(o, 'arch', ['moe', 'dense', 'nanogpt'])
    if best and not o['quick']:
        m, want = best['moe'], NANOGPT_VAL - 0.2
        record('arch', f"MoE below its dense twin and nanoGPT's {NANOGPT_VAL} - 0.2", m, '',
               goal=f"< {best['dense']:.4f} and <= {want:.4f}", ok=m < best['dense'] and m <= want)


# ----------------------------------------------------------------------------- DeepSeek-V4 against V3
def bench_v4(o):
    best = train_runs(o, 'v4', ['moe', 'v4'])
    if best:
        record('v4', f"v4 - moe best val loss in {o['max_time']} s (below 0: V4's parts win)", best['v4'] - best['moe'], '')
    # mHC's cost: the V4 model's training step with 4 streams and with 1, and the V3 MoE's, interleaved
    dev, dt = o['device'], pick_dtype(o['dtype'], o['device'])
    found = list(configs(o, 'v4', ['config/shakespeare_char_v4.py', 'config/shakespeare_char_moe.py']))
    if len(found) < 2:
        return
    (_, config, v4), (_, _, moe) = found
    B, T = 2 if o['quick'] else config['batch_size'], config['block_size']  # --quick: the code path, a small batch
    cfgs = {'v4': v4, 'v4 hc_mult=1': replace(v4, hc_mult=1), 'moe': moe}
    steps = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        steps[name] = train_step(Transformer(cfg).to(dev).train(), B, T, dev, dt)[0]
    med, times = compare(steps, o['reps'], dev)
    for name in cfgs:
        record('v4', f"{name}: training step ({dt}, {B}x{T})", 1e3 * med[name], 'ms')
    record('v4', f"mHC's cost: v4 (hc_mult={v4.hc_mult}) / v4 hc_mult=1 time per step", ratio(times, 'v4', 'v4 hc_mult=1'), 'x')
    record('v4', "v4 / moe time per step", ratio(times, 'v4', 'moe'), 'x')


# ----------------------------------------------------------------------------- model FLOPs utilisation
def bench_mfu(o):
    dev = o['device']
    cuda, peak = dev.startswith('cuda'), peak_flops(dev)
    paths = ['config/smollm2_135m.py', 'config/deepseek_smollm2.py', 'config/deepseek_v3_tiny.py',
             'config/shakespeare_moe.py']
    # on CPU the code path runs at a toy size (no peak is known, so no MFU): the figure is only FLOP/s
    toy = {} if cuda else dict(n_layer=2, block_size=64)
    for tag, config, cfg in configs(o, 'mfu', paths[::3] if o['quick'] else paths, **toy):
        B, T, dt = config['batch_size'] if cuda else 1, cfg.block_size, 'bfloat16' if cuda else 'float32'
        torch.manual_seed(0)
        model = Transformer(cfg).to(dev).train()
        step, _ = train_step(torch.compile(model) if cuda else model, B, T, dev, dt)
        med, _ = compare({'step': step}, o['reps'] if cuda else 2, dev, inner=5 if cuda else 1)
        flops = model.flops_per_token() * B * T / med['step']
        record('mfu', f"{tag}: model TFLOP/s ({dt}, {'compiled' if cuda else 'eager, toy size'})", flops / 1e12,
               'TFLOP/s', batch=B, block=T)
        goal = 0.25 if model.moes else 0.40
        if peak:
            record('mfu', f"{tag}: MFU", 100 * flops / peak, '%', goal=f">= {100 * goal:.0f}%", ok=flops / peak >= goal,
                   peak_flops=peak)


# ----------------------------------------------------------------------------- data preparation
# the child reports its own peak: ru_maxrss of a child counts the parent's memory it was forked from
PEAK_WRAPPER = ("import atexit, runpy, sys\natexit.register(lambda: print('\\nVmHWM', next(l.split()[1] for l in "
                "open('/proc/self/status') if l.startswith('VmHWM'))))\nsys.argv = sys.argv[1:]\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")
WORDS = ("the of and to a in that is was he for it with as his on be at by I had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people Mr how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three").split()


def run_prepare(args, tmp, name):
    """prepare.py with args, writing tmp/name: (its meta.json, tokens/s of the whole process, peak memory in MiB)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, '-c', PEAK_WRAPPER, os.path.join(ROOT, 'prepare.py'), *args,
                           f"--data_dir={tmp}"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'TQDM_DISABLE': '1'})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"prepare.py {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    with open(os.path.join(tmp, name, 'meta.json')) as f:
        meta = json.load(f)
    return meta, (meta['train_tokens'] + meta['val_tokens']) / wall, int(proc.stdout.split('VmHWM')[-1].split()[0]) / 1024


def bench_prepare(o):
    meta = os.path.join(ROOT, o['data_dir'], 'shakespeare', 'meta.json')
    source = json.load(open(meta)).get('source', '') if os.path.exists(meta) else ''
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(os.path.join(ROOT, source)):
            _, speed, rss = run_prepare(['shakespeare', f"--input={os.path.join(ROOT, source)}"], tmp, 'shakespeare')
            record('prepare', 'Tiny Shakespeare, GPT-2 BPE: tokens/s (whole process)', speed, 'tok/s')
            record('prepare', 'Tiny Shakespeare: peak memory', rss, 'MiB')
        else:
            record('prepare', f"skipped Tiny Shakespeare: no source file in {o['data_dir']}/shakespeare/meta.json", '-', '')
        big = o['corpus_mb'] or (20 if o['quick'] else 200)
        peaks = {}
        for mb in (max(1, big // 10), big):  # English-like words, deterministic
            corpus, rnd, size = os.path.join(tmp, f"corpus{mb}.jsonl"), random.Random(0), 0
            with open(corpus, 'w') as f:
                while size < mb * 2**20:
                    doc = ' '.join(rnd.choices(WORDS, k=rnd.randint(50, 400))).capitalize() + '.'
                    size += f.write(json.dumps({'text': doc}) + '\n')
            meta, speed, peaks[mb] = run_prepare(['hf', f"--dataset={corpus}", f"--name=c{mb}"], tmp, f"c{mb}")
            record('prepare', f"synthetic {mb} MB (hf jsonl, streamed): tokens/s", speed, 'tok/s',
                   tokens=meta['train_tokens'] + meta['val_tokens'])
            record('prepare', f"synthetic {mb} MB: peak memory", peaks[mb], 'MiB')
            os.remove(corpus)
        small, large = sorted(peaks)
        r = peaks[large] / peaks[small]
        record('prepare', f"peak memory {large} MB / {small} MB corpus", r, 'x', goal='flat (<= 1.2x)', ok=r <= 1.2)


# ----------------------------------------------------------------------------- serving
def bench_serve(o):
    from bench_serve import bench_serve as run
    goals = {'aggregate tokens/s, 8 clients / 1 client': 6, 'one client / sample.py decode': 0.8}
    for name, value, unit in run(o['quick'], dtype=o['dtype']):
        goal = goals.get(name)
        record('serve', name, value, unit, **(dict(goal=f'>= {goal}x', ok=value >= goal) if goal else {}))


# ----------------------------------------------------------------------------- DeepSeek Sparse Attention
@torch.no_grad()
def bench_dsa(o):
    """One-token decoding steps after N cached tokens, in --dtype's autocast (auto: bf16 where the device has it),
    for one row and for DSA_ROWS rows decoding together: DSA reads index_topk of the N (and scores all N with its
    small indexer), dense MLA all N. The caches hold random latents: speed does not depend on what they hold. 16 cached tokens
    time what a step costs besides attention, so each size gives attention's share of dense MLA's step."""
    dev, dt, steps = o['device'], pick_dtype(o['dtype'], o['device']), 8
    record('dsa', f"model DSA_MODEL ({DSA_MODEL_TEXT}), {dt}: parameters",
           Transformer(ModelConfig(**DSA_MODEL, index_topk=256)).num_params(), '')
    for rows in (1, DSA_ROWS):
        alone = None
        for n in [16, 1024, 4096] if o['quick'] else [16, 1024, 4096, 16384]:
            sparse = {k: ModelConfig(**DSA_MODEL, block_size=n + 1, index_topk=k) for k in (256, 512)}
            torch.manual_seed(0)
            models = {f"DSA k={k}": Transformer(c).to(dev).eval() for k, c in sparse.items()}
            dense = Transformer(replace(sparse[256], index_topk=0)).to(dev).eval()
            dense.load_state_dict(models['DSA k=256'].state_dict(), strict=False)  # the same weights, no indexers
            models['dense MLA'] = dense
            token = torch.zeros(rows, 1, dtype=torch.long, device=dev)
            with autocast(dev, dt):
                for m in models.values():
                    m.setup_cache(rows, n + 1)  # in the autocast dtype
                    for layer in m.layers:
                        for c in layer.attn.cache:
                            c.normal_()
                fns = {name: (lambda m=m: m(token, start_pos=n)) for name, m in models.items()}
                med, times = compare(fns, o['reps'], dev, inner=steps)
            for m in models.values():
                m.setup_cache(0, 0)
            at = f"{n} cached tokens, {rows} row{'s' if rows > 1 else ''}"
            alone = alone or med['dense MLA']
            if n == 16:
                record('dsa', f"{at}: dense MLA (the step besides attention)", rows / alone, 'tok/s')
                continue
            for name in models:
                record('dsa', f"{at}: {name}", rows / med[name], 'tok/s')
            record('dsa', f"{at}: attention's share of dense MLA's step", 100 * (1 - alone / med['dense MLA']), '%')
            for k in (256, 512):
                r = ratio(times, 'dense MLA', f"DSA k={k}")
                goal = n == 16384 and k == 512 and rows == DSA_ROWS
                record('dsa', f"{at}: DSA k={k} speed / dense MLA", r, 'x',
                       **(dict(goal='>= 3x', ok=r >= 3) if goal else {}))
    per = {name: m.cache_bytes_per_token(torch.bfloat16) for name, m in models.items()}
    record('dsa', "cache B/token bf16, all layers: " + ', '.join(per), ' / '.join(map(str, per.values())), 'B')


# dsa_quality: V3.2's route from a dense model (report sec. 2.1.1) at a character model's scale: the share of the wall
# clock trained dense, then the steps of the indexers' dense warm-up, and index_topk (an eighth of the block)
DSA_QUALITY = dict(config='config/shakespeare_char_dsa.py', dense_share=0.5, index_warmup=30, index_topk=128)


def bench_dsa_quality(o):
    """Dense MLA and DeepSeek Sparse Attention at the same wall clock, reported, not tuned: two arms side by side,
    each on one thread (OMP_NUM_THREADS=1), so that they share the machine and its load equally. The dense arm
    trains the config's model with index_topk=0 for dsa_time seconds; the DSA arm trains it dense for the first
    dense_share of them, gives it indexers (convert.py add-indexers: iteration 0, no optimizer state), warms them up
    (index_warmup steps, which are also the new run's learning-rate warm-up) and trains sparse for the rest."""
    found = char_data(o, 'dsa_quality')
    if not found:
        return
    q, dt, budget = DSA_QUALITY, pick_dtype(o['dtype'], o['device']), o['dsa_time'] or (40 if o['quick'] else 600)
    common = [f"--data_dir={found[0]}", '--dataset=shakespeare_char', f"--device={o['device']}", f"--dtype={dt}"]
    dense = [q['config'], *common, '--index_topk=0', '--sample_interval=0', '--eval_interval=200']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    with tempfile.TemporaryDirectory() as tmp:
        arm = start_train([*dense, f"--max_time={budget}"], os.path.join(tmp, 'dense'), env)
        first, first_wall = run_train([*dense, f"--max_time={round(budget * q['dense_share'])}"],
                                      os.path.join(tmp, 'dsa-dense'), env)
        convert = subprocess.run([sys.executable, CONVERT, 'add-indexers', f"--out_dir={os.path.join(tmp, 'dsa-dense')}",
                                  f"--to={os.path.join(tmp, 'dsa')}", f"--index_topk={q['index_topk']}",
                                  f"--index_warmup={q['index_warmup']}"], cwd=ROOT, env=env, capture_output=True, text=True)
        if convert.returncode:
            raise RuntimeError(f"convert.py add-indexers failed:\n{(convert.stdout + convert.stderr)[-2000:]}")
        left = budget - (time.perf_counter() - arm[3])
        sparse, _ = run_train([f"--resume={os.path.join(tmp, 'dsa')}", *common, f"--max_time={max(1, round(left))}",
                               f"--warmup_iters={q['index_warmup']}"], os.path.join(tmp, 'dsa'), env)
        rows, wall = finish_train(arm)
    end = {'dense MLA': rows, 'DSA after warm-up': sparse}
    how = f"{budget} s each, side by side, 1 thread each, {dt}"
    for name, arm_rows in end.items():
        last = [r for r in arm_rows if r.get('val_loss') is not None][-1]
        record('dsa_quality', f"{name}: val loss at the end ({how})", last['val_loss'], '', iter=last['iter'])
    record('dsa_quality', "iterations: dense MLA / DSA arm's dense part + its sparse part (warm-up included)",
           f"{rows[-1]['iter']} / {first[-1]['iter']} + {sparse[-1]['iter']}", '', dense_wall_s=round(wall, 1),
           dsa_dense_part_wall_s=round(first_wall, 1))
    kl = [(r['iter'], r['indexer']) for r in sparse if 'indexer' in r]
    val = [(r['iter'], r['val_indexer']) for r in sparse if 'val_indexer' in r]
    marks = [kl[0], *[p for p in kl if p[0] == q['index_warmup']][:1], kl[-1]]
    record('dsa_quality', "indexer KL (train) at iterations " + ', '.join(str(i) for i, _ in marks),
           ' / '.join(f"{v:.3f}" for _, v in marks), '', series=kl, val_series=val, warmup=q['index_warmup'])


def machine(dev):
    if dev.startswith('cuda'):
        return torch.cuda.get_device_name(dev)
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        name = platform.processor() or 'cpu'
    return (f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{'with' if cpu_has_bf16() else 'no'} bf16 instructions (avx512_bf16/amx_bf16)")


def main(argv):
    o, _ = configure(DEFAULTS, argv, __doc__, [__file__], RULES)
    try:  # a bad --out fails now, not after the sections have run
        open(o['out'] + '.tmp', 'wb').close()
        os.remove(o['out'] + '.tmp')
    except OSError as e:
        fail(f"cannot write --out={o['out']}: {e.strerror}")
    if os.path.isdir(o['out']):
        fail(f"--out={o['out']} is a folder: give a file name")
    o.update(device=pick_device(o['device']), reps=o['reps'] or (3 if o['quick'] else 7))
    RESULTS.clear()
    info = dict(command=shlex.join(['python', 'bench.py', *argv]), machine=machine(o['device']), device=o['device'],
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), load_before=os.getloadavg())
    print(f"{info['command']}\n{info['machine']} | torch {info['torch']} | {info['date']} | "
          f"load average {info['load_before'][0]:.2f}", flush=True)
    t0 = time.perf_counter()
    for section in [s for s in SECTIONS if s in o['only'].split(',')] or SECTIONS:
        print(f"[{section}]", flush=True)
        t = time.perf_counter()
        globals()[f"bench_{section}"](o)
        info[f"{section}_s"] = round(time.perf_counter() - t, 1)
    info.update(load_after=os.getloadavg(), total_s=round(time.perf_counter() - t0, 1))
    atomic_write(o['out'], lambda f: f.write(json.dumps(dict(info=info, results=RESULTS), indent=1).encode()))
    print(f"wrote {o['out']} ({len(RESULTS)} figures, {info['total_s']} s; load average now {info['load_after'][0]:.2f})")


if __name__ == '__main__':
    main(sys.argv[1:])
