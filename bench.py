"""
What the model costs and what it buys, each figure measured beside its comparison in the same run:

    python bench.py                     # every section: a table on stdout, every figure in bench.json
    python bench.py --quick             # smaller and fewer repeats: under 2 minutes on 2 CPU cores
    python bench.py --only=moe,generate # some sections: train, moe, generate, arch, mfu, prepare

Sections (BENCHMARKS.md records their figures and goals):
  train     training step of config/shakespeare_moe.py against a dense model with the same active
            parameters per token: ms/iter, tokens/s and memory, eager and compiled
  moe       one DeepSeekMoE layer against a dense SwiGLU of the same active width, forward + backward
  generate  decoding with the MLA cache against recomputing the prefix; cache bytes per token for MLA,
            multi-head and grouped-query attention; MoE decoding against a dense model
  arch      train.py on shakespeare_char with the MoE and the dense config: best val loss in the same time
  mfu       model FLOPs utilisation on CUDA (bf16, compiled); on CPU only the code path runs, on a toy size
  prepare   prepare.py tokens/s and peak memory: GPT-2 BPE on Tiny Shakespeare and a synthetic corpus

Timings run the things compared in turn (a, b, a, b, ...) and report medians and the median of the
per-round ratios, so that a ratio holds on a shared, noisy machine. Options are --key=value (see OPTS).
"""
import json
import re
import shlex
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import torch

import model as M
from common import atomic_write, fail, peak_flops, pick_dtype
from configurator import configure
from model import ModelConfig, Transformer
from train import DEFAULTS

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("train", "moe", "generate", "arch", "mfu", "prepare")
OPTS = dict(
    quick=False,  # smaller sizes and fewer repeats (under 2 minutes on 2 CPU cores)
    only="",  # comma-separated sections to run; empty = all
    out="bench.json",  # where the figures go
    device="",  # '' = cuda if available, else cpu
    reps=0,  # timing rounds per comparison; 0 = 3 with --quick, 7 without
    budget=178.0,  # arch: the wall-clock seconds each config gets (nanoGPT's CPU recipe takes about 178 s here)
    arch_moe="",  # arch: extra train.py overrides for the MoE config, e.g. "--max_iters=3900 --lr_decay_iters=3900"
    arch_dense="",  # arch: the same for the dense config
    corpus_mb=0,  # prepare: size of the synthetic corpus in MB; 0 = 200, or 20 with --quick
    threads=0,  # torch CPU threads; 0 = torch's default (one per core)
)
RESULTS = []
THREADS_ENV = {}  # OMP_NUM_THREADS for the train.py and prepare.py runs, when --threads is given


def parse_args(argv):
    opts = dict(OPTS)
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in opts:
            fail(f"unknown option {arg!r}; options: {', '.join('--' + k for k in OPTS)}")
        if isinstance(OPTS[key], bool):
            opts[key] = value.lower() in ("", "1", "true", "yes")
        else:
            try:
                opts[key] = type(OPTS[key])(value)
            except ValueError:
                fail(f"--{key} must be a {type(OPTS[key]).__name__}, got {value!r}")
    only = [s for s in opts["only"].split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        fail(f"unknown section(s) {', '.join(bad)}; sections: {', '.join(SECTIONS)}")
    opts["only"] = only or list(SECTIONS)
    opts["reps"] = opts["reps"] or (3 if opts["quick"] else 7)
    opts["device"] = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
        THREADS_ENV["OMP_NUM_THREADS"] = str(opts["threads"])
    return opts


def record(section, name, value, unit, goal=None, ok=None, **extra):
    """One figure: printed at once and kept for the table and bench.json. goal: a string, ok: met or not."""
    row = dict(section=section, name=name, value=value, unit=unit, goal=goal, ok=ok, **extra)
    RESULTS.append(row)
    v = f"{value:,.4g}" if isinstance(value, float) else str(value)
    print(f"  {section:<9} {name:<52} {v:>12} {unit:<10} {goal or ''} {'' if ok is None else '(met)' if ok else '(NOT met)'}",
          flush=True)
    return value


def compare(fns, reps, sync=lambda: None, inner=1, warmup=True):
    """Time each of fns (a dict of callables) reps times, in turn, after one warm-up call each.
    Returns ({name: median seconds per call}, {name: list of per-round seconds})."""
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


def load_config(path, **overrides):
    """train.py's resolved config dict for a config file (plus overrides)."""
    config, _ = configure(DEFAULTS, [os.path.join(ROOT, path)] + [f"--{k}={v!r}" for k, v in overrides.items()], "", [])
    return config


def model_config(config, **kw):
    """The ModelConfig of a train.py config dict, with changes kw. vocab_size 0 there means the dataset's:
    from its meta.json when prepared, else 65 for a char dataset and GPT-2's 50257 otherwise."""
    args = {k: config[k] for k in ModelConfig.__dataclass_fields__}
    if not args["vocab_size"]:
        meta = os.path.join(ROOT, config["data_dir"], config["dataset"], "meta.json")
        args["vocab_size"] = json.load(open(meta))["vocab_size"] if os.path.exists(meta) else (
            65 if config["dataset"].endswith("_char") else
            49152 if any(k in config["dataset"] for k in ("smollm", "cosmopedia")) else 50257)
    return ModelConfig(**{**args, **kw})


def dense_twin(cfg):
    """The dense model with the same active parameters per token: every routed-and-shared FFN becomes one
    SwiGLU of the active width (n_activated + n_shared) * moe_inter_dim."""
    width = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    return ModelConfig(**{**cfg.__dict__, "n_routed_experts": 0, "inter_dim": width, "moe_layers": []})


def synchronizer(device):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


# ----------------------------------------------------------------------------- 1. training step
def train_step_fn(model, batch, block, vocab, device, dtype):
    """One training iteration as train.py runs it: forward, backward, fused AdamW, bias update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ctx = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32" else torch.autocast(
        device.split(":")[0], enabled=False)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab, (batch, block), generator=g).to(device) for _ in range(2))
    raw = getattr(model, "_orig_mod", model)

    def step():
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.update_bias(raw.moe_counts()[0])
    return step, opt


def memory_bytes(model, step, opt, device):
    """Peak memory of a training step: the CUDA allocator's peak, or on CPU the bytes of the weights,
    their gradients, the AdamW state and the activations autograd saves for the backward pass."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    weights = sum(p.nbytes for p in model.parameters())
    return 2 * weights + state + sum(saved.values())


def bench_train(o):
    runs = [(p, load_config(p)) for p in ("config/shakespeare_moe.py", "config/shakespeare_char_moe.py")]
    dev, sync = o["device"], synchronizer(o["device"])
    for where, config in runs:
        moe_cfg = model_config(config)
        cfgs = {"moe": moe_cfg, "dense": dense_twin(moe_cfg)}
        B, T, tag = config["batch_size"], config["block_size"], os.path.basename(where)
        dtype = pick_dtype(config["dtype"], dev)
        for mode in ["eager"] if o["quick"] else ["eager", "compiled"]:
            steps, mems = {}, {}
            for name, cfg in cfgs.items():
                torch.manual_seed(0)
                model = Transformer(cfg).to(dev).train()
                step, opt = train_step_fn(model, B, T, cfg.vocab_size, dev, dtype)
                mems[name] = memory_bytes(model, step, opt, dev) if mode == "eager" else None
                if mode == "compiled":  # inductor's on-disk cache can make a repeated compile fast
                    model = torch.compile(model)
                    step, opt = train_step_fn(model, B, T, cfg.vocab_size, dev, dtype)
                    t = time.perf_counter()
                    step(), step()
                    record("train", f"{tag}: {name} compile, first 2 steps", time.perf_counter() - t, "s")
                steps[name] = step
            med, times = compare(steps, o["reps"], sync)
            for name, cfg in cfgs.items():
                m = Transformer(cfg)
                detail = dict(config=where, mode=mode, dtype=dtype, batch=B, block=T, active_params=m.num_params(True),
                              total_params=m.num_params())
                record("train", f"{tag}: {name} {mode} ms/iter ({dtype}, {B}x{T})", 1e3 * med[name], "ms", **detail)
                record("train", f"{tag}: {name} {mode} tokens/s", B * T / med[name], "tok/s", **detail)
                if mems[name] is not None:
                    kind = "CUDA peak" if dev.startswith("cuda") else "weights+grads+adam+saved"
                    record("train", f"{tag}: {name} memory ({kind})", mems[name] / 2**20, "MiB", **detail)
            record("train", f"{tag}: moe / dense time per iter ({mode})", ratio(times, "moe", "dense"), "x")


# ----------------------------------------------------------------------------- 2. the MoE layer
def bench_moe(o):
    # the default dense width (8/3 D rounded up to 64: 384 at 128 wide, 704 at 256) split in 3 (2 routed + 1
    # shared); at 256 wide also 768 = 3 x 256, whose 256-wide experts suit grouped_mm (16-byte rows)
    sizes = [(768, 128, 0), (4096, 256, 0), (4096, 256, 768)]
    goal = {768: 1.5, 4096: 1.2} if o["device"] == "cpu" else {768: 1.3, 4096: 1.3}
    sync = synchronizer(o["device"])
    for N, D, inter in sizes:
        for E in (8, 16, 64):
            cfg = ModelConfig(n_embd=D, n_routed_experts=E, n_activated_experts=2, n_shared_experts=1, inter_dim=inter)
            torch.manual_seed(0)
            moe = M.MoE(cfg).to(o["device"])
            dense = M.MLP(D, cfg.inter_dim).to(o["device"])
            for p in list(moe.parameters()) + list(dense.parameters()):
                torch.nn.init.normal_(p, std=0.02)
            x = torch.randn(1, N, D, device=o["device"], requires_grad=True)

            def run(layer, loop=False):
                def f():
                    ok = M.grouped_mm_ok
                    if loop:
                        M.grouped_mm_ok = lambda *a: False
                    try:
                        layer(x).sum().backward()
                    finally:
                        M.grouped_mm_ok = ok
                    layer.zero_grad(set_to_none=True)
                return f
            fns = {"moe": run(moe), "dense": run(dense)}
            grouped = M.grouped_mm_ok(x, D, cfg.moe_inter_dim)
            if grouped:  # the per-expert loop too, as a check on the choice
                fns["loop"] = run(moe, loop=True)
            med, times = compare(fns, o["reps"], sync, inner=3 if N < 1000 else 1)
            r = ratio(times, "moe", "dense")
            record("moe", f"{N} tok x {D} wide, {E} experts of {cfg.moe_inter_dim}: moe / dense", r, "x", goal=f"<= {goal[N]}x",
                   ok=r <= goal[N], moe_ms=1e3 * med["moe"], dense_ms=1e3 * med["dense"],
                   dispatch="grouped_mm" if grouped else "loop", moe_inter_dim=cfg.moe_inter_dim)
            if grouped:
                record("moe", f"  ... per-expert loop instead of grouped_mm", ratio(times, "loop", "dense"), "x",
                       loop_ms=1e3 * med["loop"])


# ----------------------------------------------------------------------------- 3. generation
def bench_generate(o):
    dev, sync = o["device"], synchronizer(o["device"])
    config = load_config("config/shakespeare_moe.py")
    char = load_config("config/shakespeare_char_moe.py")
    prompt_len = 16
    # the char model at 256 and 1024 new tokens; the BPE demo, whose recomputation mostly times its 50k-wide
    # output head over every position, at 256
    runs = [("shakespeare_char_moe.py", char, n) for n in ([256] if o["quick"] else [256, 1024])]
    runs += [("shakespeare_moe.py", config, 256)]
    for where, c, n in runs:
        cfg = model_config(c, block_size=prompt_len + n)  # no sliding window: the cache is never re-encoded
        torch.manual_seed(0)
        model = Transformer(cfg).to(dev).eval()
        idx = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=dev)
        fns = {"cache": lambda: model.generate(idx, n, temperature=0),
               "recompute": lambda: model.generate(idx, n, temperature=0, use_cache=False)}
        med, times = compare(fns, 1 if n > 256 else max(1, o["reps"] // 2), sync, warmup=n <= 256)
        detail = dict(prompt=prompt_len, greedy=True)
        record("generate", f"{where}: {n} new tokens, MLA cache", n / med["cache"], "tok/s", **detail)
        record("generate", f"{where}: {n} new tokens, recompute prefix", n / med["recompute"], "tok/s", **detail)
        r = ratio(times, "recompute", "cache")
        record("generate", f"{where}: {n} new tokens, cache speed-up over recompute", r, "x",
               goal=">= 15x" if n == 1024 else None, ok=r >= 15 if n == 1024 else None)
    # cache bytes per token per layer, in bf16 as a decoder holds it: the same trunk with three attentions
    shapes = {"shakespeare_moe.py": model_config(config).__dict__}
    for path in ("config/deepseek_v3_tiny.py", "config/deepseek_smollm2.py"):
        shapes[os.path.basename(path)] = model_config(load_config(path)).__dict__
    shapes["ModelConfig defaults"] = ModelConfig().__dict__
    for where, mla in shapes.items():
        h = mla["n_head"]
        kv = max(d for d in range(1, h + 1) if h % d == 0 and d <= max(1, h // 3))
        per = {}
        for name, kw in {"MLA": {}, "MHA": {"attn": "gqa", "n_kv_head": h},
                         f"GQA {kv} kv heads": {"attn": "gqa", "n_kv_head": kv}}.items():
            c = ModelConfig(**{**mla, **kw, "n_layer": 1, "mtp_depth": 0, "vocab_size": 64})
            per[name] = Transformer(c).cache_bytes_per_token(torch.bfloat16)
        record("generate", f"{where}: cache B/token/layer bf16, " + ", ".join(per), " / ".join(map(str, per.values())),
               "B", n_head=h, n_embd=mla["n_embd"], kv_lora_rank=mla["kv_lora_rank"], qk_rope_head_dim=mla["qk_rope_head_dim"])
        r = per["MHA"] / per["MLA"]
        record("generate", f"{where}: MLA cache smaller than MHA by", r, "x", goal=">= 4x", ok=r >= 4)
    # MoE against the dense model of the same active size: cached greedy decoding of one sequence
    n = 64 if o["quick"] else 256
    for where, c in (("shakespeare_moe.py", config), ("shakespeare_char_moe.py", char)):
        moe_cfg = model_config(c, block_size=prompt_len + n)
        torch.manual_seed(0)
        models = {"moe": Transformer(moe_cfg).to(dev).eval(), "dense": Transformer(dense_twin(moe_cfg)).to(dev).eval()}
        idx = torch.randint(0, moe_cfg.vocab_size, (1, prompt_len), device=dev)
        med, times = compare({k: (lambda m=m: m.generate(idx, n, temperature=0)) for k, m in models.items()},
                             o["reps"], sync)
        for k in models:
            record("generate", f"{where}: {k} cached decoding, {n} tokens", n / med[k], "tok/s")
        r = ratio(times, "dense", "moe")
        record("generate", f"{where}: MoE decoding speed / dense of same active size", r, "x", goal=">= 0.6x", ok=r >= 0.6)


# ----------------------------------------------------------------------------- 4. what the architecture buys
def run_train(args, budget):
    """Run train.py with args; returns (wall seconds, [(seconds since start, iter, val loss)]) from its eval
    lines, timestamped as they arrive."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **THREADS_ENV, "PYTHONUNBUFFERED": "1"})
    evals, tail = [], []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if line.startswith("eval iter "):  # "eval iter 250: train 1.9000, val 1.9500, val ppl 7.03"
            it = int(line.split()[2].rstrip(":"))
            val = float(re.search(r", val ([\d.]+)", line).group(1))
            evals.append((time.perf_counter() - t0, it, val))
    if proc.wait():
        raise RuntimeError(f"train.py {' '.join(args)} failed:\n{''.join(tail)}")
    return time.perf_counter() - t0, evals


def bench_arch(o):
    data = os.path.join(ROOT, "data", "shakespeare_char")
    configs = {"moe": "config/shakespeare_char_moe.py", "dense": "config/shakespeare_char_dense.py"}
    if not os.path.exists(os.path.join(data, "train.bin")):
        return record("arch", "skipped: no data/shakespeare_char (python prepare.py shakespeare_char)", "-", "")
    budget = o["budget"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, path in configs.items():
            args = [path, f"--out_dir={os.path.join(tmp, name)}", "--dataset=shakespeare_char", "--sample_interval=0",
                    *o[f"arch_{name}"].split()]
            if o["quick"]:  # the code path only: a few iterations, no claim about the goal
                args += ["--max_iters=20", "--eval_interval=10", "--eval_iters=5", "--warmup_iters=2"]
            wall, evals = run_train(args, budget)
            within = [v for t, _, v in evals if t <= budget] or [float("nan")]
            results[name] = min(within)
            record("arch", f"{name}: best val loss within {budget:.0f} s", min(within), "", config=path,
                   overrides=o[f"arch_{name}"], wall_s=wall, evals=evals, quick=o["quick"])
            final = evals[-1] if evals else (wall, 0, float("nan"))
            record("arch", f"{name}: wall time; {final[1]} iterations, final val loss {final[2]:.4f}", wall, "s")
    if not o["quick"]:
        m, d = results["moe"], results["dense"]
        record("arch", "MoE below dense in the same time, and <= 1.60", m, "", goal="< dense and <= 1.60",
               ok=m < d and m <= 1.60, dense=d)


# ----------------------------------------------------------------------------- 5. model FLOPs utilisation
def bench_mfu(o):
    dev = o["device"]
    cuda, peak = dev.startswith("cuda"), peak_flops(dev)
    goals = {"config/smollm2_135m.py": 0.40}
    paths = ["config/smollm2_135m.py", "config/deepseek_smollm2.py", "config/deepseek_v3_tiny.py",
             "config/shakespeare_moe.py"]
    if o["quick"]:
        paths = paths[:1] + paths[-1:]
    for path in paths:
        # on CPU the code path runs at a toy size (no peak is known, so no MFU): the figure is only FLOP/s
        toy = {} if cuda else dict(n_layer=2, batch_size=1, block_size=64, gradient_accumulation_steps=1)
        config = load_config(path, **toy)
        cfg = model_config(config)
        torch.manual_seed(0)
        model = Transformer(cfg).to(dev).train()
        dtype = "bfloat16" if cuda else "float32"
        if cuda:
            model = torch.compile(model)
        step, _ = train_step_fn(model, config["batch_size"], config["block_size"], cfg.vocab_size, dev, dtype)
        med, _ = compare({"step": step}, o["reps"] if cuda else 2, synchronizer(dev), inner=5 if cuda else 1)
        raw = getattr(model, "_orig_mod", model)
        flops = raw.flops_per_token() * config["batch_size"] * config["block_size"] / med["step"]
        goal = goals.get(path, 0.25) if raw.moe_layer_ids or path in goals else None
        record("mfu", f"{os.path.basename(path)}: model TFLOP/s ({dtype}{', compiled' if cuda else ', eager, toy size'})",
               flops / 1e12, "TFLOP/s", batch=config["batch_size"], block=config["block_size"])
        if peak:
            record("mfu", f"{os.path.basename(path)}: MFU", 100 * flops / peak, "%", goal=f">= {100 * goal:.0f}%"
                   if goal else None, ok=flops / peak >= goal if goal else None, peak_flops=peak)
        else:
            record("mfu", f"{os.path.basename(path)}: MFU (no peak FLOPs known for {machine(dev)})", "-", "")


# ----------------------------------------------------------------------------- 6. data preparation
# the child reports its own peak: ru_maxrss of a child counts the parent's memory it was forked from
PEAK_WRAPPER = ("import atexit, runpy, sys\n"
                "def peak():\n"
                "    with open('/proc/self/status') as f:\n"
                "        print('\\nVmHWM', next(l.split()[1] for l in f if l.startswith('VmHWM')))\n"
                "atexit.register(peak)\n"
                "sys.argv = sys.argv[1:]\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_prepare(args):
    """Run prepare.py with args; returns (wall seconds, peak resident memory of that process in MiB)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, os.path.join(ROOT, "prepare.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **THREADS_ENV, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"prepare.py {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return wall, int(proc.stdout.split("VmHWM")[-1].split()[0]) / 1024


def synthetic_corpus(path, mb):
    """mb megabytes of JSON-lines documents of English-like words, deterministic."""
    import random
    rnd = random.Random(0)
    words = ("the of and to a in that is was he for it with as his on be at by I had not are but from or have an "
             "they which one you were her all she there would their we him been has when who will more no if out so "
             "said what up its about into than them can only other new some could time these two may then do first "
             "any my now such like our over man me even most made after also did many before must through back years "
             "where much your way well down should because each just those people Mr how too little state good very "
             "make world still own see men work long get here between both life being under never day same another "
             "know while last might us great old year off come since against go came right used take three").split()
    with open(path, "w") as f:
        size = 0
        while size < mb * 2**20:
            doc = " ".join(rnd.choices(words, k=rnd.randint(50, 400))).capitalize() + "."
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)


def bench_prepare(o):
    meta = os.path.join(ROOT, "data", "shakespeare", "meta.json")
    source = json.load(open(meta)).get("source", "") if os.path.exists(meta) else ""
    source = source if os.path.isabs(source) else os.path.join(ROOT, source)
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(source):
            wall, rss = run_prepare(["shakespeare", f"--input={source}", f"--data_dir={tmp}"])
            m = json.load(open(os.path.join(tmp, "shakespeare", "meta.json")))
            n = m["train_tokens"] + m["val_tokens"]
            record("prepare", "Tiny Shakespeare, GPT-2 BPE: tokens/s (whole process)", n / wall, "tok/s", tokens=n, wall_s=wall)
            record("prepare", "Tiny Shakespeare: peak memory", rss, "MiB")
        else:
            record("prepare", "skipped Tiny Shakespeare: no data/shakespeare/meta.json source file", "-", "")
        big = o["corpus_mb"] or (20 if o["quick"] else 200)
        peaks = {}
        for mb in (max(1, big // 10), big):
            corpus = os.path.join(tmp, f"corpus{mb}.jsonl")
            synthetic_corpus(corpus, mb)
            wall, rss = run_prepare(["hf", f"--dataset={corpus}", f"--name=c{mb}", f"--data_dir={tmp}"])
            m = json.load(open(os.path.join(tmp, f"c{mb}", "meta.json")))
            n = m["train_tokens"] + m["val_tokens"]
            peaks[mb] = rss
            record("prepare", f"synthetic {mb} MB (hf jsonl, streamed): tokens/s", n / wall, "tok/s", tokens=n, wall_s=wall)
            record("prepare", f"synthetic {mb} MB: peak memory", rss, "MiB")
            os.remove(corpus)
        small, large = sorted(peaks)
        r = peaks[large] / peaks[small]
        record("prepare", f"peak memory {large} MB / {small} MB corpus", r, "x", goal="flat (<= 1.2x)", ok=r <= 1.2)


def machine(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv):
    o = parse_args(argv)
    info = dict(command=shlex.join(["python", "bench.py", *argv]), machine=machine(o["device"]), device=o["device"],
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), load_before=os.getloadavg())
    print(f"{info['command']}\n{info['machine']} | torch {info['torch']} | {info['date']} | "
          f"load average {info['load_before'][0]:.2f}", flush=True)
    funcs = dict(train=bench_train, moe=bench_moe, generate=bench_generate, arch=bench_arch, mfu=bench_mfu,
                 prepare=bench_prepare)
    t0 = time.perf_counter()
    for section in o["only"]:
        print(f"[{section}]", flush=True)
        t = time.perf_counter()
        funcs[section](o)
        info[f"{section}_s"] = round(time.perf_counter() - t, 1)
    info.update(load_after=os.getloadavg(), total_s=round(time.perf_counter() - t0, 1))
    atomic_write(o["out"], lambda f: f.write(json.dumps(dict(info=info, results=RESULTS), indent=1).encode()))
    print(f"wrote {o['out']} ({len(RESULTS)} figures, {info['total_s']} s; load average now {info['load_after'][0]:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
