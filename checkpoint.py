"""
Checkpoints: the dict train.py saves, and how every script finds one, reads it, and builds the model and
tokenizer it holds. A checkpoint is a torch.save'd dict:
  model_args   ModelConfig's fields          model        the model's state dict
  optimizer    AdamW's state (train.py)      scaler       GradScaler's state (fp16)
  iter_num, best_val_loss, tokens_seen, lr_scale         where the run is
  config       the run's resolved config     meta         the tokenizer: prepare.py's meta.json
  budget       max_time's measurements (train.Budget), so that a resumed run lands on time too
  token_counts how often each token occurs in the training data [V]: what speculative drafts choose among
That is all it takes to continue a training exactly: its batches, dropout masks and samples draw from
generators seeded by (seed, iteration), so the config's seed and iter_num are the whole random state, and the
MoE routing biases are buffers in the model's state dict.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import zipfile

import torch

from common import atomic_write, fail, pick_device, pick_dtype, prepare_command
from generate import drafts_per_step
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_checkpoint(path, names=('best.pt', 'ckpt.pt')):
    """path itself if it is a file, else the first of names that exists in the folder path; None if none."""
    if os.path.isfile(path):
        return path
    return next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)


def require_checkpoint(path):
    """find_checkpoint(path), or one line saying there is none and how to train one."""
    found = find_checkpoint(path)
    if found is None:
        fail(f"no checkpoint: {path} holds no best.pt or ckpt.pt; train one with "
             f"`python prepare.py shakespeare_char && python train.py config/shakespeare_char_moe.py`, "
             f"or pass --out_dir=DIR or --ckpt=PATH")
    return found


def require_drafts(model, path, without, drafts):
    """--speculative's check (sample.py, serve.py) -> the tokens a step drafts (generate.drafts_per_step; --drafts=0:
    its default): speculative decoding drafts with the model's MTP modules, so a checkpoint with mtp_depth=0 gets
    one line saying so, ending 'or {without} without --speculative', and drafts it cannot make one line too."""
    if not model.cfg.mtp_depth:
        fail(f"--speculative drafts with the model's MTP modules, and {path} has none (mtp_depth=0): "
             f"train with --mtp_depth=1, or {without} without --speculative")
    try:
        return drafts_per_step(model.cfg, drafts)
    except ValueError as e:
        fail(f"--{e}")


def load_for_generation(c, script):
    """What sample.py and serve.py start from, given their options c (device, dtype, ckpt, out_dir, speculative,
    drafts):
    (checkpoint path, model, checkpoint dict, tokenizer, meta, device, dtype), or one line saying what is wrong."""
    if c['drafts'] and not c['speculative']:
        fail(f"--drafts={c['drafts']} sets how many tokens speculative decoding drafts a step: add --speculative, "
             f"or leave --drafts out")
    device = pick_device(c['device'])
    dtype = pick_dtype(c['dtype'], device, decoding=True)
    path = require_checkpoint(c['ckpt'] or c['out_dir'])
    model, ckpt = load_model(path, device)
    if c['speculative']:  # c['drafts'] becomes the number a step drafts
        c['drafts'] = require_drafts(model, path, script, c['drafts'])
    tok, meta = load_tokenizer(path, ckpt)
    return path, model, ckpt, tok, meta, device, dtype


def make_checkpoint(model_args, model, config, meta=None, iter_num=0, best_val_loss=float('inf'), tokens_seen=0,
                    lr_scale=1.0, optimizer=None, scaler=None, budget=None, token_counts=None):
    """The checkpoint dict; model is a state dict. What train.py resumes from and what convert.py imports to."""
    return dict(model_args=model_args, model=model, optimizer=optimizer, scaler=scaler, iter_num=iter_num,
                best_val_loss=best_val_loss, tokens_seen=tokens_seen, lr_scale=lr_scale, config=config, meta=meta,
                budget=budget, token_counts=token_counts)


def draft_vocabulary(counts, tokens=8192):
    """The ids speculative drafts choose among (Transformer.draft_head), from a checkpoint's token_counts [V]: the
    `tokens` most frequent in the training data that occur there at all (FR-Spec, Zhao et al. 2025), sorted; None
    (every token) without counts or for a vocabulary under four times as many, where the head is cheap anyway."""
    if counts is None or counts.numel() < 4 * tokens:
        return None
    top = counts.topk(tokens)
    return top.indices[top.values > 0].sort().values


def save_checkpoint(path, state, best):
    """Write the checkpoint dict to path (ckpt.pt) atomically, and link best.pt to it if best. A write that fails
    (a full disk) leaves the previous files intact and no .tmp filling the disk: one line, exit status 1."""
    tmp = os.path.join(os.path.dirname(path), 'best.pt.tmp')
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        if best:  # a hard link to the same bytes, a copy where links fail
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, os.path.join(os.path.dirname(path), 'best.pt'))
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # a second Ctrl-C stops at once, wherever in the save it lands: torch.save reports one that lands inside
        # its writer as a RuntimeError caused by it
        if isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            raise
        free = shutil.disk_usage(os.path.dirname(path) or '.').free / 2 ** 20
        sys.exit(f"error: could not save {path} ({free:,.0f} MiB free there; {str(e).splitlines()[0][:100]}): the "
                 f"partial file is removed and the last checkpoint is intact; free some space, then --resume=auto")


def full_state(raw_model, optimizer):
    """Full (unsharded, CPU) model and optimizer state dicts, the same with or without DDP/FSDP, keyed by
    parameter name; a collective under FSDP, where only rank 0 receives them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw_model, options=opts), get_optimizer_state_dict(raw_model, optimizer, options=opts)


def load_state(raw_model, optimizer, ckpt):
    """Load a checkpoint's model and optimizer state into this (possibly sharded) model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(raw_model, ckpt['model'], options=opts)
    if ckpt.get('optimizer'):
        set_optimizer_state_dict(raw_model, optimizer, ckpt['optimizer'], options=opts)


def read_checkpoint(path, keys=('model_args', 'model', 'config', 'iter_num'),
                    advice='resume from another checkpoint (best.pt?) or start fresh without --resume'):
    """The checkpoint dict in path, loaded as data (weights_only), with a compiled model's "_orig_mod."
    prefixes stripped; or one clear line saying what is wrong: damaged, or without the keys the caller needs."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch reports damage in many ways; the user needs to know which file and why
        what = 'corrupt' if zipfile.is_zipfile(path) else 'empty' if os.path.getsize(path) == 0 else \
            'truncated or not a checkpoint'
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        fail(f"checkpoint {path} is {what}: {reason}; {advice}")
    missing = [k for k in keys if k not in ckpt] if isinstance(ckpt, dict) else list(keys)
    if missing:
        fail(f"{path} is not a checkpoint written by train.py (it lacks {', '.join(missing)})")
    ckpt['model'] = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    return ckpt


def tokenizer_id(meta):
    """A short hash of what makes a tokenizer (its name, vocabulary size and character table) in a meta.json:
    two datasets share it only when every id means the same token, whatever their names or sizes."""
    what = json.dumps([meta.get(k) for k in ('tokenizer', 'vocab_size', 'chars')])
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def load_model(path, device='cpu'):
    """(model in eval mode on device, checkpoint dict) for inference, from a checkpoint train.py or convert.py wrote."""
    ckpt = read_checkpoint(path, ('model_args', 'model'), 'use another checkpoint or train again')
    unknown = sorted(set(ckpt['model_args']) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        fail(f"{path} was written by another model.py: unknown model_args {', '.join(unknown)}")
    try:
        model = Transformer(ModelConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])
    except (AssertionError, RuntimeError, TypeError, ValueError) as e:
        fail(f"{path} does not fit model.py: {str(e).splitlines()[0][:200]}")
    if not all(torch.isfinite(t).all() for t in ckpt['model'].values() if t.is_floating_point()):
        fail(f"{path} holds non-finite weights (a diverged run): sample from an earlier checkpoint, e.g. best.pt")
    model.draft_ids = draft_vocabulary(ckpt.get('token_counts'))
    return model.to(device).eval(), ckpt


def find_meta(ckpt):
    """(tokenizer description or None, where it was looked for): the checkpoint's "meta", else the
    meta.json prepare.py wrote for its dataset (data_dir/DATASET/, data_dir relative to this folder, as in train.py)."""
    if ckpt.get('meta'):
        return ckpt['meta'], 'the checkpoint'
    config = ckpt.get('config') or {}
    dataset = config.get('dataset')
    meta_path = os.path.join(ROOT, config.get('data_dir', 'data'), str(dataset or 'DATASET'), 'meta.json')
    if not dataset or not os.path.isfile(meta_path):
        return None, meta_path
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        fail(f"{meta_path} is not valid JSON ({e}): run `{prepare_command(dataset)}` again")
    if not isinstance(meta, dict):
        fail(f"{meta_path} is not a meta.json prepare.py wrote: run `{prepare_command(dataset)}` again")
    return meta, meta_path


def load_tokenizer(path, ckpt):
    """(tokenizer, meta) the model in checkpoint path was trained with, or one clear line saying why not."""
    from tokenizer import get_tokenizer
    meta, where = find_meta(ckpt)
    if meta is None:
        fail(f"{path} names no tokenizer: it has no meta, and {where} does not exist; run "
             f"`{prepare_command((ckpt.get('config') or {}).get('dataset') or 'DATASET')}` to make it")
    try:
        return get_tokenizer(meta), meta
    except (ValueError, OSError, ImportError, KeyError) as e:
        fail(f"cannot build the tokenizer of {path} ({meta.get('tokenizer')!r}): {e}")
