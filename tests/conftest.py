# Shared pytest set-up: plain `pytest` (not just `python -m pytest`) imports the top-level scripts
# (model, prepare, tokenizer, ...) from the repository root, and what several test modules share.
import dataclasses
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the Ctrl-C tests send SIGINT to the scripts they start: a suite launched in the background of a shell without job
# control inherits SIGINT ignored, and so would they; with a handler here, they start with the default, as from a
# terminal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from model import ModelConfig, Transformer  # noqa: E402 (after the path is set)

CHARS = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
META = {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS)}
BLOCK = 48


def save_model(path, attn="mla", meta=META, prefix="", config=None, mtp_depth=0, vocab_size=len(CHARS), **model_args):
    """A tiny random checkpoint as train.py writes them, char-level unless meta and vocab_size say otherwise
    (meta={"tokenizer": "gpt2"}, vocab_size=50257); model_args: other ModelConfig values. Weights are scaled up
    from the init so that greedy text varies for a while instead of repeating one character."""
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                attn=attn, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                n_routed_experts=4, n_dense_layers=1, inter_dim=64, moe_inter_dim=16,
                                mtp_depth=mtp_depth), **model_args})
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


# train.py's tests' model: a 2-layer MLA + MoE model small enough for many short runs on a CPU
TINY = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--kv_lora_rank=16', '--qk_nope_head_dim=8',
        '--qk_rope_head_dim=8', '--v_head_dim=8', '--n_routed_experts=4', '--n_activated_experts=2',
        '--moe_inter_dim=32', '--block_size=16', '--batch_size=4', '--dtype=float32', '--eval_iters=2',
        '--learning_rate=3e-3', '--warmup_iters=2', '--min_lr=3e-4', '--log_interval=1']


def make_dataset(root, name, words=("to be or not ", "the king ", "my lord ", "thou art ", "o romeo ")):
    """A char-level dataset, as prepare.py writes one (before it counted bytes): random phrases, so there is
    something to learn."""
    rng = np.random.default_rng(0)
    text = ''.join(words[i] for i in rng.integers(0, len(words), 4000))
    chars = sorted(set(text))
    ids = np.array([chars.index(ch) for ch in text], dtype=np.uint16)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    ids[:15000].tofile(os.path.join(root, name, 'train.bin'))
    ids[15000:].tofile(os.path.join(root, name, 'val.bin'))
    with open(os.path.join(root, name, 'meta.json'), 'w') as f:
        json.dump({'vocab_size': len(chars), 'tokenizer': 'char', 'chars': ''.join(chars)}, f)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A data_dir with two char datasets of different vocabularies, 'tiny' and 'wide'."""
    root = str(tmp_path_factory.mktemp('data'))
    make_dataset(root, 'tiny')
    make_dataset(root, 'wide', words=("zebra quick ", "jumps vex ", "WALTZ BAD NYMPH "))
    return root


def rows(out_dir):
    """The rows of a training run's metrics.jsonl."""
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def full_disk(limit):
    """A subprocess.run preexec_fn: files written grow to at most `limit` bytes, then writes fail with an OSError
    (EFBIG), as on a full disk, without needing a full disk (SIGXFSZ, which would kill the process, is ignored)."""
    def limit_writes():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit_writes


def rows_decode_as_alone(model, vocab, lengths, rows, steps, slots, earlier):
    """Continuous batching's check: sequences of `lengths` prefilled one by one into cache `rows` (which first held
    an `earlier`-token batch that must stay out of sight), then decoded `steps` tokens together, each at its own
    position, give each sequence's full-forward logits."""
    seqs = [torch.randint(0, vocab, (1, n + steps)) for n in lengths]
    model.setup_cache(max(rows.tolist()) + 1, slots)
    model(torch.randint(0, vocab, (max(rows.tolist()) + 1, earlier)), start_pos=0)  # the rows' previous occupants
    out = [[model(s[:, :n], start_pos=torch.tensor([0]), rows=rows[i:i + 1])[0]]  # prefill each into its row
           for i, (s, n) in enumerate(zip(seqs, lengths))]
    for t in range(steps):
        idx = torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)])
        logits = model(idx, start_pos=torch.tensor(lengths) + t, rows=rows)[0]
        for i in range(len(seqs)):
            out[i].append(logits[i:i + 1])
    for s, o in zip(seqs, out):
        assert torch.allclose(torch.cat(o, 1), model(s)[0], atol=1e-5)
    model.setup_cache(0, 0)


def rows_slide_as_the_full_forward(model, x, full, rows, lengths, atol):
    """Decoding past the context: sequences x [B, T] prefilled one by one (lengths) into cache `rows` [B] (which
    first held other sequences), then decoded in ragged right-padded steps of 2 tokens (1 or 2 of them real, as
    with a draft; a finished row's are all padding), each row at its own position, give the logits `full` of the
    full forward over x; so does the lockstep path (an int start_pos for rows 0..B-1) after a block-long prefill."""
    T, vocab, block = x.size(1), model.cfg.vocab_size, model.cfg.block_size
    g = torch.Generator().manual_seed(1)
    model.setup_cache(max(rows.tolist()) + 1)
    model(torch.randint(0, vocab, (max(rows.tolist()) + 1, block)), start_pos=0)  # the rows' previous occupants
    out = [[model(x[b:b + 1, :n], start_pos=torch.tensor([0]), rows=rows[b:b + 1]).logits]
           for b, n in enumerate(lengths)]
    pos = list(lengths)
    while min(pos) < T:
        n = [min(int(torch.randint(1, 3, (), generator=g)), T - p) for p in pos]
        idx = torch.randint(0, vocab, (len(x), 2), generator=g)  # the padding
        for b in range(len(x)):
            idx[b, :n[b]] = x[b, pos[b]:pos[b] + n[b]]
        logits = model(idx, start_pos=torch.tensor(pos), rows=rows).logits
        for b in range(len(x)):
            out[b].append(logits[b:b + 1, :n[b]])
            pos[b] += n[b]
    assert torch.allclose(torch.cat([torch.cat(o, 1) for o in out]), full, atol=atol)
    model.setup_cache(len(x))
    steps = [model(x[:, :block], start_pos=0).logits] + [model(x[:, t:t + 1], start_pos=t).logits
                                                         for t in range(block, T)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=atol)
    model.setup_cache(0)


def index_grads(model, x, weight):
    """(every parameter's gradient of the training loss on x with index_loss_weight=weight, the loss's parts): what
    the indexers' KL reaches (DSA's and V4's CSA indexers)."""
    model.zero_grad()
    model.cfg.index_loss_weight = weight
    out = model(x[:, :-1], x[:, 1:])
    out.loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}, out.parts


def warm_up(model, x, steps, lr):
    """steps of AdamW on the training loss over x with the indexers warming up (Transformer.warm_up_indexers) ->
    (the indexers' KL at each step, the names of the parameters that moved)."""
    model.warm_up_indexers(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    before = {n: p.clone() for n, p in model.named_parameters()}
    kl = []
    for _ in range(steps):
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        kl.append(out.parts["indexer"].item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return kl, {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
