"""
Train a DeepSeek-style model (model.py) on a dataset made by prepare.py, on one device:

    python train.py config/shakespeare_char_moe.py --max_time=600 --resume=auto

train_ddp.py runs this same loop in several processes under torchrun. The keys and their defaults
follow; every ModelConfig field in model.py is a key too, and RULES below says which values each takes.
configurator.py explains the syntax.
"""
import contextlib
import fcntl
import io
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from types import SimpleNamespace

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import numpy as np
import torch

from checkpoint import (find_checkpoint, full_state, load_state, make_checkpoint, read_checkpoint, save_checkpoint,
                        tokenizer_id)
from common import DTYPES, atomic_write, autocast, fail, peak_flops, pick_device, pick_dtype, prepare_command
from configurator import at_least, between, check, configure, field_defaults, one_of, refusal
from generate import generate as generate_tokens
from model import ConfigError, ModelConfig, Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'  # checkpoints, metrics.jsonl, config.json and curves.png
eval_interval = 250  # evaluate and checkpoint every this many iterations (and at the end)
log_interval = 10  # a log line and a metrics.jsonl row every this many iterations
eval_iters = 50  # batches of each split per evaluation
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # write ckpt.pt at every eval; False: only when val loss improves (nanoGPT)
resume = ''  # '' = start fresh; a checkpoint or an out_dir; 'auto' = out_dir/ckpt.pt if there is one
overwrite = False  # start afresh in an out_dir that holds a trained run, removing its ckpt.pt and best.pt
wandb_log = False  # log to Weights & Biases (pip install wandb)
wandb_project = 'deepseek'  # wandb project name
wandb_run_name = 'run'  # wandb run name
tensorboard_log = False  # log to TensorBoard in out_dir/tb (pip install tensorboard)
# samples
sample_interval = 0  # print a sample every this many iterations and at the end; 0 = never
sample_prompt = '\n'  # what the samples continue
sample_tokens = 200  # tokens per sample
temperature = 0.8  # sampling temperature; 0 = greedy
top_k = 200  # sample among the top_k most likely tokens; 0 = all
# data
dataset = 'shakespeare'  # data_dir/<dataset>/{train,val}.bin and meta.json, made by prepare.py
data_dir = 'data'  # folder holding the datasets (prepare.py's --data_dir); relative to train.py's folder
gradient_accumulation_steps = 1  # micro-batches per optimizer step over all processes; rounded up to a multiple of them
batch_size = 12  # sequences per micro-batch
# optimizer: AdamW
learning_rate = 6e-4  # peak learning rate
max_iters = 5000  # optimizer steps in total; with max_time, fitted to the time (see resolve_config for which wins)
max_time = 0  # seconds from start to exit, evals and checkpoints included: max_iters is fitted as the run goes; 0 = off
weight_decay = 0.1  # AdamW weight decay, on matrices only (not norms, biases)
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping (the norm is logged anyway)
# learning rate schedule
decay_lr = True  # False: constant learning_rate, no warmup (nanoGPT)
lr_schedule = 'cosine'  # 'cosine' to min_lr, or 'wsd': warmup, stable, then linear decay to min_lr
warmup_iters = 100  # linear warmup steps
lr_decay_iters = 0  # the decay reaches min_lr here; 0 = max_iters (the one max_time fixes, too)
min_lr = 6e-5  # final learning rate, about learning_rate / 10 (Chinchilla)
wsd_decay_frac = 0.2  # 'wsd': the last fraction of lr_decay_iters that decays
nan_patience = 3  # non-finite steps in a row before going back to ckpt.pt at half the learning rate
# system
device = ''  # '' = cuda, else mps, else cpu; or e.g. 'cuda:1'
dtype = 'auto'  # 'float32', 'bfloat16' (autocast), 'float16' (autocast + GradScaler); 'auto': see common.pick_dtype
compile = False  # torch.compile the model (about a minute on CPU before the first step)
seed = 1337  # seeds the initialisation and, with the iteration, every batch, dropout mask and sample
fsdp = False  # train_ddp.py: shard parameters, gradients and optimizer state with FSDP2
ddp_timeout = 600  # train_ddp.py: seconds a rank waits for the others before it stops
# -----------------------------------------------------------------------------
MODEL_DEFAULTS = field_defaults(ModelConfig)
TRAIN_DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k.islower()
                  and isinstance(v, (int, float, bool, str))}
DEFAULTS = {**MODEL_DEFAULTS, 'vocab_size': 0, **TRAIN_DEFAULTS}  # vocab_size 0 = the dataset's meta.json
SOURCES = (os.path.join(ROOT, 'train.py'), os.path.join(ROOT, 'model.py'))  # where --help finds each key's comment
BELOW_ONE = between(0, 1, open_high=True)
RULES = dict(  # the values each key takes (configurator.check): the model's keys as ModelConfig.RULES says, and
    ModelConfig.RULES, vocab_size=at_least(0),  # the training's; check_config checks what involves several keys
    eval_interval=at_least(1), log_interval=at_least(1), eval_iters=at_least(1), sample_interval=at_least(0),
    sample_tokens=at_least(1), temperature=at_least(0), top_k=at_least(0), gradient_accumulation_steps=at_least(1),
    batch_size=at_least(1), learning_rate=at_least(0), max_iters=at_least(0), max_time=at_least(0),
    weight_decay=at_least(0), beta1=BELOW_ONE, beta2=BELOW_ONE, grad_clip=at_least(0),
    lr_schedule=one_of('cosine', 'wsd'), warmup_iters=at_least(0), lr_decay_iters=at_least(0), min_lr=at_least(0),
    wsd_decay_frac=between(0, 1), nan_patience=at_least(1), dtype=one_of(*DTYPES), seed=between(0, 2 ** 63 - 1),
    ddp_timeout=at_least(1))
NOT_RESUMED = ('resume', 'overwrite', 'device', 'fsdp')  # properties of this launch, not of the run
TRAIN, EVAL, DROPOUT, SAMPLE = range(4)  # what a random stream is for: the first part of its seed
INTERRUPTED = "interrupted: stopped at once, without saving; --resume=auto continues from the last checkpoint"


def rng(c, *key):
    """A numpy generator determined by (seed, *key) alone: batches and dropout do not depend on the
    history of the run, so resuming, or splitting a batch over more processes, draws the same."""
    return np.random.default_rng([c.seed, *key])


def get_batch(c, data, split, key, n, rows, device):
    """Rows `rows` of the n random windows of split that key names: inputs and targets, [len(rows), T]. A token id
    past the vocabulary (a .bin changed after prepare.py recorded its largest id) is one line naming the file."""
    tokens = np.memmap(os.path.join(data.path, f'{split}.bin'), dtype=np.uint16, mode='r')  # reopened: memmaps leak
    ix = rng(c, *key).integers(0, len(tokens) - c.block_size - 1, size=n)[rows]
    window = np.stack([tokens[i:i + c.block_size + 1] for i in ix]).astype(np.int64)
    if window.size and window.max() >= data.vocab:
        fail(f"{data.path}/{split}.bin is corrupt: it holds token id {window.max()}, past the model's {data.vocab}-token "
             f"vocabulary, though meta.json says its largest id is smaller: run `{prepare_command(c.dataset)}` again")
    x, y = torch.from_numpy(window[:, :-1]).contiguous(), torch.from_numpy(window[:, 1:]).contiguous()
    if 'cuda' in device:
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(c, it):
    """Learning rate of iteration it: linear warmup, then cosine (or stable-then-linear) to min_lr."""
    if not c.decay_lr:
        return c.learning_rate
    end = c.lr_decay_iters or c.max_iters
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it >= end:
        return c.min_lr
    if c.lr_schedule == 'wsd':
        start = max(c.warmup_iters, end - round(c.wsd_decay_frac * end))
        return c.learning_rate - (c.learning_rate - c.min_lr) * max(0, it - start) / max(1, end - start)
    ratio = (it - c.warmup_iters) / max(1, end - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def resolve_config(config, explicit, processes=1, say=print):
    """(config namespace, checkpoint path, checkpoint) of the run: a resumed run takes its config from its
    checkpoint, except the properties of this launch and the keys the user set (explicit: {key: where}); then
    every value is checked (RULES). max_time and max_iters both set: the one given on the command line wins over
    one from a config file, else max_iters does; a note says which. gradient_accumulation_steps, unless given on
    the command line (which check_config holds to) or resumed, is rounded up to a multiple of the processes, so
    that each takes an equal share, at least one micro-batch; a config file's value rounded up gets a note."""
    path = config['resume'] and find_checkpoint(config['out_dir'] if config['resume'] == 'auto' else config['resume'],
                                                ('ckpt.pt',))
    if config['resume'] not in ('', 'auto') and not path:
        fail(f"--resume={config['resume']}: no checkpoint at {config['resume']} (use a ckpt.pt, an out_dir holding one, "
             f"or --resume=auto)")
    ckpt = read_checkpoint(path) if path else None
    if ckpt:
        stored = {k: v for k, v in ckpt['config'].items() if k in DEFAULTS and k not in NOT_RESUMED}
        config = {**config, **stored, **{k: config[k] for k in explicit}}
    elif not explicit.get('gradient_accumulation_steps', '').startswith('--'):  # the default's or a config file's
        steps = config['gradient_accumulation_steps']
        config['gradient_accumulation_steps'] = -(-steps // processes) * processes
        if steps % processes and 'gradient_accumulation_steps' in explicit:
            say(f"note: gradient_accumulation_steps={steps} ({explicit['gradient_accumulation_steps']}) rounded up to "
                f"{config['gradient_accumulation_steps']}, a multiple of the {processes} processes")
    if 'max_iters' in explicit and config['max_time']:
        cli = {k: explicit.get(k, '').startswith('--') for k in ('max_time', 'max_iters')}
        where = {k: explicit.get(k, 'the checkpoint' if ckpt else 'the default') for k in ('max_time', 'max_iters')}
        if cli['max_time'] and not cli['max_iters']:
            say(f"note: max_time={config['max_time']:g} ({where['max_time']}) wins over max_iters={config['max_iters']} "
                f"({where['max_iters']}): max_iters is fitted to the time")
        else:
            say(f"note: max_iters={config['max_iters']} ({where['max_iters']}) turns max_time={config['max_time']:g} "
                f"({where['max_time']}) off")
            config['max_time'] = 0
    check(config, RULES)
    return SimpleNamespace(**config), path, ckpt


def check_config(c, processes):
    """Fail on the first rule that involves several keys (RULES checks each key alone), the model's (ModelConfig
    checks itself) and the launch's, in one line that names the key, its value and what is allowed."""
    try:  # vocab_size 0 is the dataset's, read later
        ModelConfig(**{**{k: getattr(c, k) for k in MODEL_DEFAULTS}, 'vocab_size': c.vocab_size or 1})
    except ConfigError as e:
        fail(str(e))
    if c.gradient_accumulation_steps % processes:
        fail(refusal('gradient_accumulation_steps', c.gradient_accumulation_steps,
                     f"a multiple of the {processes} processes: each takes an equal share of every batch"))


def open_dataset(c):
    """The dataset (path: its folder, meta: its meta.json, vocab: the model's vocab_size, counts: token_counts of its
    train.bin), or one line saying what is wrong:
    a file missing, a meta.json that is not prepare.py's, a .bin that is not uint16 tokens or is too short, or
    token ids the model's vocabulary lacks (an IndexError on CPU, a device-side assert on CUDA, much later)."""
    path = os.path.join(ROOT, c.data_dir, c.dataset)
    missing = [f for f in ('train.bin', 'val.bin', 'meta.json') if not os.path.isfile(os.path.join(path, f))]
    if missing:
        fail(f"no dataset in {path} (no file {', '.join(missing)}): run `{prepare_command(c.dataset)}` first "
             f"(a config names the command for its corpus in a comment; or set --data_dir)")
    again = f"run `{prepare_command(c.dataset)}` again"
    try:
        with open(os.path.join(path, 'meta.json'), encoding='utf-8') as f:
            meta = json.load(f)
    except ValueError:  # not JSON, or not UTF-8
        meta = None
    if not (isinstance(meta, dict) and type(meta.get('vocab_size')) is int and meta['vocab_size'] >= 1):
        fail(f"{path}/meta.json is not one prepare.py wrote (a JSON object with a positive integer vocab_size): {again}")
    if c.vocab_size and c.vocab_size < meta['vocab_size']:
        fail(f"vocab_size={c.vocab_size} is smaller than the dataset's {meta['vocab_size']} tokens")
    vocab = c.vocab_size or meta['vocab_size']
    for split in ('train', 'val'):
        file = os.path.join(path, f'{split}.bin')
        if os.path.getsize(file) % 2:
            fail(f"{split}.bin of {c.dataset} has an odd number of bytes, so it is not uint16 tokens: {again}")
        if os.path.getsize(file) // 2 <= c.block_size + 1:
            fail(f"{split}.bin of {c.dataset} has fewer than block_size + 2 = {c.block_size + 2} tokens")
        # prepare.py records the largest id; a .bin of another length than it wrote is scanned
        top = meta.get(f'{split}_max_id') if os.path.getsize(file) == 2 * meta.get(f'{split}_tokens', -1) else None
        top = max_token(file) if top is None else top
        if top >= vocab:
            fail(f"{split}.bin of {c.dataset} holds token id {top}, but the model's vocabulary has {vocab} tokens "
                 f"({'vocab_size' if c.vocab_size else 'meta.json'}): {again}, or set a larger --vocab_size")
    counts = token_counts(os.path.join(path, 'train.bin'), vocab)
    return SimpleNamespace(path=path, meta=meta, vocab=vocab, counts=counts)


def token_counts(path, vocab, limit=2 ** 24):
    """How often each id occurs among the first `limit` tokens of a .bin, [vocab] int64 (checkpoint.draft_vocabulary
    ranks them): enough of any corpus to rank its common tokens, read in a moment."""
    return torch.from_numpy(np.bincount(np.memmap(path, dtype=np.uint16, mode='r')[:limit], minlength=vocab))


def max_token(path, chunk=2 ** 26):
    """The largest token id in a .bin, read 128 MB at a time: a corpus of any size is checked in little memory."""
    data = np.memmap(path, dtype=np.uint16, mode='r')
    return max(int(data[i:i + chunk].max()) for i in range(0, len(data), chunk))


def claim_out_dir(c, ckpt_path, say):
    """Make out_dir and lock it for this run; returns the lock's release. Or fail in one line: out_dir cannot be
    written, another training holds it, or it holds a trained run that this one would replace (never by default)."""
    path = os.path.join(c.out_dir, 'lock')
    try:
        os.makedirs(c.out_dir, exist_ok=True)
        while True:  # flock: the kernel releases the lock of a process that dies, however it dies
            f = open(path, 'a+')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                fail(f"out_dir {c.out_dir} is in use by another training ({f.read().strip() or 'starting'}): "
                     f"wait for it to end, stop it, or pick another --out_dir")
            if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
            f.close()  # its owner removed it as it let go, after we opened it: lock the file there now
    except OSError as e:
        fail(f"out_dir={c.out_dir!r} cannot be used ({e.strerror}): pick a folder you can write to")
    f.seek(0)
    if f.read().strip():
        say(f"note: {path} was left by a training that ended without releasing it; taking it over")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()

    def release():
        os.remove(path)  # before unlocking: a process that opened the old file sees it gone and retries
        f.close()
    here = [n for n in ('ckpt.pt', 'best.pt') if os.path.exists(os.path.join(c.out_dir, n))]
    if here and not (ckpt_path and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), c.out_dir)):
        if not c.overwrite:
            release()
            fail(f"out_dir {c.out_dir} holds best.pt but no ckpt.pt: resume from it with --resume={c.out_dir}/best.pt, "
                 f"or pass --overwrite=True to start afresh" if c.resume == 'auto' else
                 f"out_dir {c.out_dir} holds a trained run ({', '.join(here)}) that this one would replace: resume it "
                 f"with --resume=auto, pick another --out_dir, or pass --overwrite=True to start afresh")
        for n in here:
            os.remove(os.path.join(c.out_dir, n))
        say(f"--overwrite=True: removed {', '.join(here)} of the run that was in {c.out_dir}")
    return release


def bytes_per_token(meta):
    """{split: UTF-8 bytes of text per token} from meta.json; None for one written before prepare.py counted bytes."""
    if all(f'{s}_bytes' in meta for s in ('train', 'val')):
        return {s: meta[f'{s}_bytes'] / meta[f'{s}_tokens'] for s in ('train', 'val')}


def check_fits(path, ckpt, model_args, meta, raw_model):
    """Fail clearly if the checkpoint is for another vocabulary (another tokenizer, or the same one with another
    character table) or another model shape than asked for."""
    theirs = ckpt.get('meta') or meta  # a checkpoint without meta: judge by its vocab_size alone
    if (tokenizer_id(theirs), ckpt['model_args']['vocab_size']) != (tokenizer_id(meta), model_args['vocab_size']):
        fail(f"checkpoint {path} is for another vocabulary: tokenizer {theirs.get('tokenizer')!r} #{tokenizer_id(theirs)} "
             f"with {ckpt['model_args']['vocab_size']} tokens, but this run asks for {meta.get('tokenizer')!r} "
             f"#{tokenizer_id(meta)} with {model_args['vocab_size']}; pick the checkpoint's --dataset or start fresh")
    want = {k: tuple(v.shape) for k, v in raw_model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt['model'].items()}
    if have != want:
        diff = [f"{k}={ckpt['model_args'].get(k)} (asked {v})" for k, v in model_args.items()
                if ckpt['model_args'].get(k) != v]
        fail(f"checkpoint {path} has a different model shape: {', '.join(diff) or 'other parameters'}; "
             f"pass its config (or none) to resume it")


def trim_metrics(path, iter_num):
    """Drop metrics.jsonl rows past iter_num (after a resume or rollback those iterations run again), and a
    last line that a crash or a full disk cut short."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
        if lines and not is_json(lines[-1]):
            print(f"note: dropped the cut last line of {path}")
            lines.pop()
        atomic_write(path, lambda f: f.write(''.join(line + '\n' for line in lines
                                                     if line.strip() and json.loads(line)['iter'] <= iter_num).encode()))


def is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def moe_stats(loads, dropped, layer_ids):
    """Per MoE layer: max/mean and min/mean of the tokens per expert, their coefficient of variation, and
    the share of (token, expert) pairs dropped by capacity."""
    mean = loads.mean(1).clamp(min=1e-9)
    return [dict(layer=i, max=m, min=n, cv=cv, drop=d) for i, m, n, cv, d in zip(
        layer_ids, (loads.max(1).values / mean).tolist(), (loads.min(1).values / mean).tolist(),
        (loads.std(1, unbiased=False) / mean).tolist(), (dropped / loads.sum(1).clamp(min=1)).tolist())]


def plot_curves(out_dir):
    """out_dir/curves.png: train and val loss, and the expert load (load / mean) over time, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not os.path.exists(os.path.join(out_dir, 'metrics.jsonl')):  # a run of no steps (max_iters=0) logged nothing
        return
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    heat = [[x for layer in r['expert_load'] for x in layer] for r in rows if 'expert_load' in r]
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(12 if heat else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r['iter'] for r in rows], [r['loss'] for r in rows], label='train (batch)', alpha=0.6)
    evals = [r for r in rows if 'val_loss' in r]
    ax.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', label='val')
    ax.set(xlabel='iteration', ylabel='loss', title='loss')
    ax.legend()
    if heat:
        ax = axes[0][1]
        image = ax.imshow(np.array(heat).T, aspect='auto', cmap='viridis', interpolation='nearest',
                          extent=(rows[0]['iter'], rows[-1]['iter'], len(heat[0]), 0))
        ax.set(xlabel='iteration', ylabel='MoE layer x expert', title='expert load / mean load')
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, 'curves.png'), lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def all_reduce_by_name(world, stats):
    """{name: tensor} summed over the processes in one all-reduce: {name: the sum, float32 on the CPU, same shape}."""
    shapes = [t.shape for t in stats.values()]
    flat = world.all_reduce(torch.cat([t.float().flatten() for t in stats.values()])).cpu()
    return {k: v.view(s) for k, v, s in zip(stats, flat.split([s.numel() for s in shapes]), shapes)}


@torch.no_grad()
def evaluate(model, raw_model, c, data, device, ctx, world, iters=None):
    """Mean main loss ('ce': no MTP, no balance term) over eval_iters batches per split (rounded up to
    a multiple of the processes, which share them), and with MTP, on val, how often the depth-1 module's guess
    is the data's next token ('mtp_acc') and the trunk's own next guess ('mtp_agree': the share of greedy
    drafts speculative decoding keeps). iters: batches per split instead of eval_iters."""
    model.eval()
    n = math.ceil((iters or c.eval_iters) / world.size) * world.size
    keys = ('ce',) + (('mtp_acc', 'mtp_agree') if c.mtp_depth else ()) + (('indexer',) if raw_model.indexed else ())
    out = {}
    for split in ('train', 'val'):
        total = torch.zeros(len(keys), device=device)
        for i in range(world.rank, n, world.size):
            x, y = get_batch(c, data, split, (EVAL, int(split == 'val'), i), c.batch_size, slice(None), device)
            with ctx:
                parts = model(x, y).parts
            total += torch.stack([parts[k] for k in keys]).float()
        means = dict(zip(keys, (world.all_reduce(total) / n).tolist()))
        out[split] = means.pop('ce')
        if split == 'val':
            out.update(means)
    model.train()
    return out


def eval_row(losses, bpt):
    """An evaluation's metrics: the loss of each split, val perplexity, bits per byte (the loss in bits over
    the bytes per token of the split) where meta.json counts bytes, and the MTP module's val guesses."""
    row = dict(train_loss=losses['train'], val_loss=losses['val'], val_ppl=math.exp(min(losses['val'], 50)))
    if bpt:
        row.update({f'{s}_bpb': losses[s] / math.log(2) / bpt[s] for s in ('train', 'val')})
    row.update({f'val_{k}': losses[k] for k in ('mtp_acc', 'mtp_agree', 'indexer') if k in losses})
    return row


def sampler(c, meta, say):
    """(tokenizer, prompt token ids) for the samples printed while training, or (None, None) for none."""
    if not c.sample_interval:
        return None, None
    try:
        from tokenizer import get_tokenizer
        tokenizer = get_tokenizer(meta)
        return tokenizer, tokenizer.encode(c.sample_prompt)[-c.block_size:] or [0]
    except Exception as e:  # samples are a nicety: train without them
        say(f"no samples: cannot encode sample_prompt with {c.dataset}'s tokenizer ({type(e).__name__}: {e})")
        return None, None


def generate(raw_model, tokenizer, prompt, c, iter_num, device, ctx):
    """A sample continuing the prompt, the same on every process (FSDP needs all of them to run it)."""
    torch.manual_seed(int(rng(c, SAMPLE, iter_num).integers(2 ** 62)))
    raw_model.eval()
    with ctx:
        y = generate_tokens(raw_model, torch.tensor([prompt], device=device), c.sample_tokens,
                            temperature=c.temperature, top_k=c.top_k)
    raw_model.train()
    return tokenizer.decode(y[0].tolist())


def open_trackers(c):
    """[(log a metrics row, finish)] for Weights & Biases and TensorBoard, as configured."""
    trackers = []
    if c.wandb_log:
        try:
            import wandb
        except ImportError:
            fail("wandb_log=True needs wandb: pip install wandb")
        wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=dict(vars(c)))
        trackers.append((lambda row: wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                                               step=row['iter']), wandb.finish))
    if c.tensorboard_log:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("tensorboard_log=True needs tensorboard: pip install tensorboard")
        writer = SummaryWriter(os.path.join(c.out_dir, 'tb'))
        trackers.append((lambda row: [writer.add_scalar(k, v, row['iter']) for k, v in row.items()
                                      if isinstance(v, (int, float)) and k != 'iter'], writer.close))
    return trackers


def stop_handler(stop, say, out_dir):
    """A SIGINT/SIGTERM handler: the first signal asks the loop to finish its step, save and return (it
    appends to stop); a second one stops at once."""
    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        say(f"\n{signal.Signals(signum).name}: finishing this step, saving {out_dir}/ckpt.pt, then exiting")
    return handler


def roll_back(path, raw_model, optimizer, again, bad_steps, iter_num):
    """After nan_patience non-finite steps in a row: load the checkpoint at path into the model and the
    optimizer and return it; or stop, where there is none yet or going back once already did not help."""
    if not os.path.exists(path) or again:
        sys.exit(f"stopping: {bad_steps} non-finite steps in a row at iter {iter_num}, " +
                 ("again after going back to the last checkpoint at a lower learning rate"
                  if os.path.exists(path) else "and no checkpoint yet to go back to") +
                 "; try a lower learning_rate, grad_clip or dtype=float32")
    back = read_checkpoint(path)
    load_state(raw_model, optimizer, back)
    return back


def peak_memory_mb(device):
    """The most memory this process has held so far, in MiB: CUDA's allocator on a GPU, else the resident set."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024) / 2 ** 20


def step_stats(raw_model, loads, dropped, tok_s, peak, device, eta_s):
    """What a logged row adds to a step's: MFU (of this process's tokens/s), peak memory, the time left, and
    the balance of each MoE layer."""
    stats = dict(mfu=raw_model.flops_per_token() * tok_s / peak if peak else None, mem_mb=peak_memory_mb(device),
                 eta_s=eta_s)
    if raw_model.moe_layer_ids:
        stats['moe'] = moe_stats(loads, dropped, raw_model.moe_layer_ids)
        stats['expert_load'] = (loads / loads.mean(1, keepdim=True).clamp(min=1e-9)).tolist()
    return stats


def print_row(row, c):
    """Print a metrics row: the training step, then MoE balance, then eval results and the sample."""
    if 'mfu' in row:
        eta, mfu = row['eta_s'], f"{100 * row['mfu']:.1f}%" if row['mfu'] else '-'
        indexer = f" indexer {row['indexer']:.4f}" if 'indexer' in row else ''
        print(f"iter {row['iter']}/{c.max_iters} | loss {row['loss']:.4f} (ce {row['ce']:.4f} mtp {row['mtp']:.4f} "
              f"aux {row['aux']:.4f}{indexer}) | lr {row['lr']:.2e} | norm {row['grad_norm']:.2f} | {row['ms']:.0f} ms | "
              f"{row['tok_s']:,.0f} tok/s | mfu {mfu} | "
              f"mem {row['mem_mb']:,.0f} MB | eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        if 'moe' in row:
            print('  moe load max/min/cv/drop: ' + ' | '.join(
                f"L{m['layer']} {m['max']:.2f}/{m['min']:.2f}/{m['cv']:.2f}/{100 * m['drop']:.1f}%" for m in row['moe']))
    if 'val_loss' in row:
        print(f"eval iter {row['iter']}: train {row['train_loss']:.4f}, val {row['val_loss']:.4f}, "
              f"val ppl {row['val_ppl']:.2f}" + (f", val bpb {row['val_bpb']:.4f}" if 'val_bpb' in row else '') +
              (f", MTP guesses the data {row['val_mtp_acc']:.3f}, the trunk {row['val_mtp_agree']:.3f}"
               if 'val_mtp_acc' in row else '') +
              (f", indexer KL {row['val_indexer']:.4f}" if 'val_indexer' in row else ''))
    if 'sample' in row:
        print(f"---- sample at iter {row['iter']}:\n{row['sample']}\n----")


def log_row(row, c, metrics_path, trackers):
    """Print a metrics row, append it to metrics.jsonl (strict JSON: a non-finite loss is null), hand it to the trackers."""
    print_row(row, c)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps({k: None if v != v or v in (math.inf, -math.inf) else v for k, v in row.items()}) + '\n')
    for track, _ in trackers:
        track(row)


class World:
    """The processes training together: here one. train_ddp.py passes a data-parallel world."""
    rank, size, device = 0, 1, None

    def wrap(self, model, c):
        """The model to train: the model itself, or a DDP/FSDP wrapper of it."""
        return model

    def grad_sync(self, on):
        """Whether the next backward pass all-reduces gradients (off on micro-steps before the last)."""

    def all_reduce(self, t):
        """Sum t over the processes, in place."""
        return t


class Budget:
    """max_time: the max_iters that ends the run max_time seconds after its process started, evals, checkpoints and
    the final save and plot included. It is fitted again after every step, so that a run on a machine that speeds
    up or slows down still lands, and the learning rate (which decays to max_iters) decays to where the run ends.
    It times a step (a running mean that forgets over a twentieth of the budget; the first steps of a process
    warm up and are not timed), an eval with its checkpoint, a sample, and the final plot. A few steps in, a probe
    times what an eval costs on one batch per split (a whole eval of a long-context model can take longer than
    a short budget), a sample and the plot; every real eval and sample then refines its figure. state() goes
    into the checkpoint: a resumed run goes on from the seconds already spent and the times measured, so that it
    fits what the uninterrupted run would have."""
    WARMUP, PROBE = 3, 5  # steps a process does before it times them; the step after which it probes the rest
    HOLD = 0.02  # in the last 2% of the budget max_iters holds still: the last steps follow the schedule they set

    def __init__(self, c, started, state=None, say=print):
        state = state if state and state['max_time'] == c.max_time else {}  # another max_time: a budget from now
        self.max_time, self.eval_interval, self.started, self.say = c.max_time, c.eval_interval, started, say
        self.spent = state.get('spent', 0.0)  # seconds spent before this process started
        self.step_s, self.eval_s, self.tail_s = state.get('step_s'), state.get('eval_s'), state.get('tail_s', 0.0)
        self.sample_s, self.sample_interval = state.get('sample_s'), c.sample_interval
        if c.eval_interval == 1:  # every iteration evaluates: an eval is part of a step
            self.eval_s = 0.0
        self.max_iters, self.shown = state.get('max_iters', 0), state.get('max_iters', 0)
        self.steps, self.mark, self.aside = 0, None, 0.0  # steps this process did; the clock at the end of the
        # last one; seconds of the current iteration spent probing, not stepping
        say(f"max_time={c.max_time:g} s: max_iters is fitted to it after every step, once a few steps are timed")

    def elapsed(self):
        return self.spent + time.time() - self.started

    def state(self):
        return dict(max_time=self.max_time, spent=self.elapsed(), step_s=self.step_s, eval_s=self.eval_s,
                    tail_s=self.tail_s, sample_s=self.sample_s, max_iters=self.max_iters)

    def wants_probe(self, steps_run):
        """Whether the loop should probe (and sample, to time it) after this step."""
        return self.sample_s is None and steps_run == self.PROBE  # the probe leaves sample_s at 0 or more

    def probe(self, evaluate_batch, batches, finish):
        """Time evaluate_batch (an eval of one batch per split), of which an eval does batches, and finish (what
        the run does after its last eval: the plot). The first call warms up: it took twice the second here."""
        t = time.time()
        if self.eval_s is None:  # eval_interval=1 has it: part of a step
            evaluate_batch()
            t1 = time.time()
            evaluate_batch()
            self.eval_s = batches * (time.time() - t1)
        t2 = time.time()
        finish()
        self.tail_s, self.aside = time.time() - t2, time.time() - t
        self.sample_s = self.sample_s or 0.0  # a run that samples times it at this step too

    def after_step(self, iter_num, evaluated, sampled=0.0):
        """Time the iteration that just ended (evaluated: it evaluated and saved too; sampled: the seconds its
        sample took, if it made one); return the max_iters that ends the run on time, 0 while nothing is timed yet."""
        now = time.time()
        took = 0.0 if self.mark is None else now - self.mark - sampled - self.aside
        self.mark, self.steps, self.aside = now, self.steps + 1, 0.0
        if sampled:
            self.sample_s = (self.sample_s + sampled) / 2 if self.sample_s else sampled
        if self.steps > self.WARMUP + 1:  # the first step's time is unknown: the mark starts at its end
            if not evaluated or self.eval_interval == 1:
                forget = 1 - math.exp(-took / (self.max_time / 20))
                self.step_s = took if self.step_s is None else self.step_s + forget * (took - self.step_s)
            elif self.step_s is not None:
                cost = max(0.0, took - self.step_s)
                self.eval_s = cost if self.eval_s is None else (self.eval_s + cost) / 2
        if self.step_s is None or self.eval_s is None or self.sample_s is None:
            return 0
        left = self.max_time - self.elapsed()
        fit = self.fit(iter_num, left)
        if not self.max_iters or (abs(fit - self.max_iters) > 1 and left >= self.HOLD * self.max_time):
            self.max_iters = fit  # a step's worth of noise moves nothing: a resumed run fits what the straight one did
        if abs(self.max_iters - self.shown) > 0.05 * self.shown or not self.shown:
            self.say(f"max_time={self.max_time:g} s: {1000 * self.step_s:.0f} ms a step, {self.eval_s:.2f} s an eval "
                     f"and checkpoint, {self.elapsed():.0f} s gone at iter {iter_num}: {self.max_iters} iterations fit")
            self.shown = self.max_iters
        return self.max_iters

    def fit(self, iter_num, left):
        """The max_iters whose steps, evals (every eval_interval and a last one), samples (likewise) and final
        plot take the nearest to left seconds from the end of iteration iter_num; at least one step more."""
        def every(interval, m):  # the iterations after iter_num up to m that are multiples of interval, or m
            return m // interval - iter_num // interval + (m % interval != 0)

        def cost(m):
            return ((m - iter_num) * self.step_s + every(self.eval_interval, m) * self.eval_s
                    + (every(self.sample_interval, m) * self.sample_s if self.sample_s else 0) + self.tail_s)
        low, high = iter_num + 1, iter_num + 2 + int(max(0, left) / max(self.step_s, 1e-9))
        while low < high:  # cost rises with m: the last m that fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) <= left else (low, mid - 1)
        # or one more, if it ends nearer the budget: with steps of seconds, always ending early misses by a step
        return low + 1 if cost(low + 1) - left < left - cost(low) else low


def train(config, explicit, world=World(), started=None):
    """Train. config: configurator's dict; explicit: {key: where the user set it}, the keys that win over the config
    stored in a checkpoint being resumed. started: when the process started, on time.time()'s clock (max_time
    counts from there; default now). The first process holds out_dir's lock while it runs."""
    started = time.time() if started is None else started
    master = world.rank == 0
    say = print if master else (lambda *a, **k: None)
    with contextlib.nullcontext() if master else contextlib.redirect_stderr(io.StringIO()):  # one error line, not one a process
        c, ckpt_path, ckpt = resolve_config(config, explicit, world.size, say)
        check_config(c, world.size)
        data = open_dataset(c)
    release = claim_out_dir(c, ckpt_path, say) if master else None
    try:
        return run(c, ckpt_path, ckpt, data, world, say, started)
    finally:
        if release:
            release()


def build(c, data, ckpt, ckpt_path, device, dtype, world):
    """(model args, raw model, model to train (DDP/FSDP-wrapped, compiled), AdamW, GradScaler), at the
    checkpoint's state when resuming."""
    model_args = {**{k: getattr(c, k) for k in MODEL_DEFAULTS}, 'vocab_size': data.vocab}
    torch.manual_seed(c.seed)
    try:
        raw_model = Transformer(ModelConfig(**model_args))
    except ConfigError as e:
        fail(str(e))
    if ckpt:
        check_fits(ckpt_path, ckpt, model_args, data.meta, raw_model)
    raw_model.to(device)
    model = world.wrap(raw_model, c)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': c.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(c.beta1, c.beta2),
                                  fused=device.split(':')[0] in ('cuda', 'cpu'))
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=dtype == 'float16')
    if ckpt:
        load_state(raw_model, optimizer, ckpt)
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
    return model_args, raw_model, torch.compile(model) if c.compile else model, optimizer, scaler


def forward_backward(model, raw_model, scaler, optimizer, c, data, iter_num, device, ctx, world):
    """This process's share of the iteration's batch, in micro-steps, gradients all-reduced on the last; then
    unscaled and clipped. Returns (mean loss, its parts, the gradient norm before clipping) as tensors."""
    k = c.gradient_accumulation_steps // world.size  # micro-steps per process
    loss, parts = torch.zeros((), device=device), dict.fromkeys(
        ('ce', 'mtp', 'aux') + (('indexer',) if raw_model.indexed else ()), 0.0)
    raw_model.warm_up_indexers(iter_num < c.index_warmup)  # DSA: the first steps train only the indexers
    for micro in range(k):
        j = world.rank * k + micro  # this micro-batch's place in the global batch of the iteration
        x, y = get_batch(c, data, 'train', (TRAIN, iter_num), c.gradient_accumulation_steps * c.batch_size,
                         slice(j * c.batch_size, (j + 1) * c.batch_size), device)
        torch.manual_seed(int(rng(c, DROPOUT, iter_num, j).integers(2 ** 62)))
        world.grad_sync(micro == k - 1)
        with ctx:
            out = model(x, y)
        scaler.scale(out.loss / k).backward()
        loss += out.loss.detach() / k
        for name in parts:
            parts[name] += out.parts[name] / k
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group['params']]
    norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or float('inf'))
    return loss, {k: torch.as_tensor(v, device=device) for k, v in parts.items()}, \
        norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # FSDP: a DTensor


def run(c, ckpt_path, ckpt, data, world, say, started):
    """The training loop, once train() has checked the config and the data and claimed out_dir."""
    master = world.rank == 0
    device = world.device or pick_device(c.device)
    dtype = pick_dtype(c.dtype, device)
    model_args, raw_model, model, optimizer, scaler = build(c, data, ckpt, ckpt_path, device, dtype, world)
    ctx = autocast(device, dtype)
    iter_num, best_val_loss, tokens_seen, lr_scale = \
        (ckpt['iter_num'], ckpt['best_val_loss'], ckpt['tokens_seen'], ckpt['lr_scale']) if ckpt else (0, math.inf, 0, 1.0)
    metrics_path, ckpt_file = os.path.join(c.out_dir, 'metrics.jsonl'), os.path.join(c.out_dir, 'ckpt.pt')
    if master:  # the resolved config, and the rows of the iterations that will run again dropped
        atomic_write(os.path.join(c.out_dir, 'config.json'), lambda f: f.write(json.dumps(vars(c), indent=1).encode()))
        trim_metrics(metrics_path, iter_num)
        print(f"{json.dumps(vars(c))}\n{raw_model.param_report()}")
    tokens_per_iter = c.gradient_accumulation_steps * c.batch_size * c.block_size
    say(f"{'resuming ' + ckpt_path + ' at' if ckpt else 'starting at'} iter {iter_num}; {device} {dtype}; "
        f"{world.size} process(es) x {c.gradient_accumulation_steps // world.size} micro-steps x {c.batch_size} x "
        f"{c.block_size} = {tokens_per_iter:,} tokens/iter (the global batch)")
    trackers = open_trackers(c) if master else []
    tokenizer, prompt = sampler(c, data.meta, say)
    peak, bpt = peak_flops(device), bytes_per_token(data.meta)
    if c.eval_only:
        losses = evaluate(model, raw_model, c, data, device, ctx, world)
        if master:
            print_row(dict(iter=iter_num, **eval_row(losses, bpt)), c)
        return losses
    budget = Budget(c, started, ckpt and ckpt.get('budget'), say) if c.max_time else None
    stop, proposal = [], 0  # the signal that asked us to stop, once the current step is done; max_iters from budget
    old_handlers = {s: signal.signal(s, stop_handler(stop, say, c.out_dir)) for s in (signal.SIGINT, signal.SIGTERM)}
    bad_steps, rolled_back_to, steps_run, t_loop = 0, None, 0, time.time()
    model.train()
    try:
        while iter_num < c.max_iters:
            t0 = time.time()
            loss, parts, norm = forward_backward(model, raw_model, scaler, optimizer, c, data, iter_num, device, ctx, world)
            # one all-reduce carries the loss, its parts, the stop flag, rank 0's max_iters and the MoE counts
            loads, dropped = raw_model.moe_counts()  # [n_moe, E] and [n_moe]; empty for a dense model
            stats = all_reduce_by_name(world, dict(
                loss=loss, **parts, stop=torch.tensor(float(bool(stop)), device=device), loads=loads, dropped=dropped,
                max_iters=torch.tensor(float(proposal if master else 0), device=device)))
            loss, norm = stats['loss'].item() / world.size, norm.item()
            parts = {name: stats[name].item() / world.size for name in parts}
            # every process stops at the step where the sum says one was asked to; a signal that comes after the
            # all-reduce waits for the next step's, or the processes would part ways and wait on each other
            stopping = stats['stop'].item() > 0
            if stats['max_iters'].item():  # the budget's fit, the same on every process: rank 0's clock decides
                c.max_iters = max(iter_num + 1, int(stats['max_iters'].item()))
            lr = get_lr(c, iter_num) * lr_scale
            for group in optimizer.param_groups:
                group['lr'] = lr
            ok = math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())  # fp16: the scaler skips
            if ok:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # auxiliary-loss-free balancing: every process applies the same loads, summed over all of them;
            # on a skipped step zero loads move no bias (sign(0) = 0) and just reset the counters
            loads, dropped = stats['loads'], stats['dropped']
            raw_model.update_bias((loads if ok else torch.zeros_like(loads)).to(device))
            iter_num, steps_run, tokens_seen = iter_num + 1, steps_run + 1, tokens_seen + tokens_per_iter
            dt = time.time() - t0
            row = dict(iter=iter_num, loss=loss, **parts, lr=lr, grad_norm=norm, skipped=not ok, ms=1000 * dt,
                       tok_s=tokens_per_iter / dt, tokens=tokens_seen)
            bad_steps = 0 if ok else bad_steps + 1
            if not ok:
                say(f"iter {iter_num}: non-finite loss {loss} or grad norm {norm}: step skipped "
                    f"({bad_steps} in a row, {c.nan_patience} allowed)")
            if bad_steps >= c.nan_patience:
                back = roll_back(ckpt_file, raw_model, optimizer, rolled_back_to is not None, bad_steps, iter_num)
                iter_num, tokens_seen, rolled_back_to = back['iter_num'], back['tokens_seen'], back['iter_num']
                lr_scale, bad_steps = lr_scale / 2, 0
                say(f"went back to {ckpt_file} (iter {iter_num}); learning rate now x{lr_scale}")
                if master:
                    trim_metrics(metrics_path, iter_num)
                continue
            # evaluate, sample and log; then checkpoint: the row is written first, so that a kill between the two
            # leaves a row past the checkpoint, which resuming drops and writes again, never a checkpoint without it
            last_iter = iter_num == c.max_iters
            probe = budget is not None and budget.wants_probe(steps_run)
            if iter_num % c.log_interval == 0 or last_iter:
                eta_s = (time.time() - t_loop) / steps_run * (c.max_iters - iter_num)
                row.update(step_stats(raw_model, loads, dropped, row['tok_s'] / world.size, peak, device, eta_s))
            improved = False
            if iter_num % c.eval_interval == 0 or last_iter:
                losses = evaluate(model, raw_model, c, data, device, ctx, world)
                row.update(eval_row(losses, bpt))
                improved = losses['val'] < best_val_loss and not bad_steps
                best_val_loss = losses['val'] if improved else best_val_loss
            sampled = time.time()
            if tokenizer and (iter_num % c.sample_interval == 0 or last_iter or probe):
                row['sample'] = generate(raw_model, tokenizer, prompt, c, iter_num, device, ctx)
            sampled = time.time() - sampled if 'sample' in row else 0.0
            if master and ('mfu' in row or 'val_loss' in row or 'sample' in row):
                log_row(row, c, metrics_path, trackers)
            saving = stopping or improved or ('val_loss' in row and c.always_save_checkpoint)
            if saving and bad_steps:  # never save weights that give non-finite steps: going back needs the last good ones
                say(f"iter {iter_num}: not saving {ckpt_file} after {bad_steps} non-finite step(s) in a row")
            elif saving:  # all it takes to continue exactly (checkpoint.py says why)
                model_sd, optim_sd = full_state(raw_model, optimizer)
                if master:
                    save_checkpoint(ckpt_file, make_checkpoint(
                        model_args, model_sd, dict(vars(c)), data.meta, iter_num, best_val_loss, tokens_seen, lr_scale,
                        optim_sd, scaler.state_dict(), budget and budget.state(), data.counts), improved)
                rolled_back_to = None
            if probe:  # what an eval and the end cost: one batch per split and the plot, timed
                budget.probe(lambda: evaluate(model, raw_model, c, data, device, ctx, world, iters=world.size),
                             math.ceil(c.eval_iters / world.size), lambda: master and plot_curves(c.out_dir))
            if stopping:
                say(f"{'stopped' if bad_steps else 'saved ' + ckpt_file} at iter {iter_num}; resume with "
                    f"--resume={c.out_dir}")
                return
            if budget:
                proposal = budget.after_step(iter_num, 'val_loss' in row, sampled)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        for _, finish in trackers:  # flush what is buffered, even when stopped by a signal
            finish()
    if master:
        plot_curves(c.out_dir)
    if budget:
        say(f"max_time={c.max_time:g} s: ran max_iters={c.max_iters} iterations in {budget.elapsed():.0f} s")
    return best_val_loss


def process_start():
    """When this process started, on time.time()'s clock (Linux: from /proc; elsewhere: now)."""
    try:
        with open('/proc/self/stat') as f:
            ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open('/proc/uptime') as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError):
        return time.time()


if __name__ == '__main__':
    try:
        train(*configure(DEFAULTS, sys.argv[1:], __doc__, SOURCES, RULES), started=process_start())
    except KeyboardInterrupt:  # before the loop installs its handler, or a second Ctrl-C
        sys.exit(INTERRUPTED)
    # everything is written and closed: skip the interpreter's teardown, a second or more of freeing objects
    # that max_time cannot see coming
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
