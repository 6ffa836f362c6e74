"""
The serving engine: one thread owns the model and decodes every running sequence in one forward pass per
step (continuous batching). A sequence that arrives while others decode is prefilled alone into a free row
of the KV cache and joins the batch at the next step; one that ends, or whose client cancelled it, leaves
its row at the next step. Each row sits at its own position (Transformer.forward with per-row start_pos)
and samples with its own temperature, top_k, top_p and torch.Generator, so what a request gets never
depends on what else is in the batch.

    engine = Engine(model, tok, max_batch=8, max_queue=64, ctx=lambda: autocast(device, dtype))
    engine.submit([Sequence(ids, max_tokens=50, emit=print, temperature=0)])  # emit(Chunk), engine thread

The context is the model's block_size: a sequence whose cache is full ends with finish_reason 'length'.

With speculative=True the model's MTP modules draft mtp_depth tokens after each sequence's last one (V3
report, sec. 5.4.3; model.speculative_stream does the same for one batch): one forward of the trunk verifies
every row's drafts at the row's own position, and each row keeps its own prefix of its drafts (model.verify,
drawing from its own generator), so a step adds 1 to mtp_depth + 1 tokens to each sequence: greedy the text of
plain decoding, sampled the same distribution. engine.speculation counts the drafts verified and those kept.
"""
import sys
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from model import draw, mtp_valid, sample, verify


class QueueFull(Exception):
    """More sequences would wait for a row than the engine's max_queue."""


@dataclass
class Chunk:
    """What one step added to a sequence: new text; with logprobs on, one (token id, logprob, {id: logprob}
    of the top alternatives) per new token (with echo the first chunk has the prompt's, the first of them
    (id, None, None)); at the end finish_reason 'length' or 'stop', or an error message."""
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""


@dataclass
class Sequence:
    """One completion to generate: prompt ids (at most block_size), sampling settings, where chunks go."""
    ids: list
    max_tokens: int
    emit: object  # emit(Chunk), called on the engine thread: it must be quick and must not raise
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple = ()  # strings that end the text, which stops before them
    logprobs: int | None = None  # k: each new token's logprob and its k most likely alternatives
    echo: bool = False  # with logprobs: the prompt tokens' logprobs too
    tokens: list = field(default_factory=list)  # generated so far (the engine's, like what follows)
    cancelled: bool = False
    pos: int = 0  # tokens in its cache row
    shown: int = 0  # characters of text emitted
    generator: torch.Generator | None = None
    # speculative decoding: the MTP caches hold positions < mtp_pos; hidden [pos - mtp_pos, D] are the trunk's
    # states at mtp_pos..pos-1, which they have not read yet; drafts: the tokens drafted after the last one,
    # drawn from the probabilities q [len(drafts), V]
    mtp_pos: int = 0
    hidden: torch.Tensor | None = None
    drafts: list = field(default_factory=list)
    q: torch.Tensor | None = None


class Engine:
    def __init__(self, model, tok, max_batch=8, max_queue=64, ctx=nullcontext, speculative=False):
        """ctx() is the context the engine thread runs the model in (autocast); max_queue the sequences that
        may wait for one of the max_batch rows before submit refuses more; speculative: draft with the model's
        MTP modules (it needs mtp_depth >= 1)."""
        if speculative and not model.cfg.mtp_depth:
            raise ValueError("speculative decoding drafts with the MTP modules: this model has mtp_depth=0")
        self.model, self.tok, self.ctx, self.max_batch, self.max_queue = model, tok, ctx, max_batch, max_queue
        self.device, self.context = model.head.weight.device, model.cfg.block_size
        self.depth = model.cfg.mtp_depth if speculative else 0  # drafts per step
        self.speculation = {"drafted": 0, "accepted": 0}  # drafts verified, drafts kept
        self.waiting, self.running, self.free = deque(), {}, list(range(max_batch))  # running: row -> Sequence
        self.cv, self.closed = threading.Condition(), False
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, seqs):
        """Queue sequences for decoding, all or none: QueueFull when more than max_queue would wait."""
        with self.cv:
            if len(self.waiting) + len(seqs) - len(self.free) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting for one of {self.max_batch} rows")
            self.waiting.extend(seqs)
            self.cv.notify()

    def cancel(self, seq):
        """Stop generating seq (its client is gone): it leaves its row at the next step."""
        seq.cancelled = True

    def load(self):
        """(sequences decoding, sequences waiting for a row)."""
        with self.cv:
            return len(self.running), len(self.waiting)

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()

    def loop(self):
        with torch.no_grad(), self.ctx():
            self.model.setup_cache(self.max_batch, self.context)  # in the autocast dtype
            while True:
                with self.cv:
                    self.cv.wait_for(lambda: self.closed or self.running or (self.waiting and self.free))
                    if self.closed:
                        return
                    admitted = []
                    while self.waiting and self.free:
                        seq = self.waiting.popleft()
                        if not seq.cancelled:
                            row = self.free.pop()
                            self.running[row] = seq
                            admitted.append(row)
                for row in admitted:
                    self.guard([row], self.prefill, row)
                for row in [r for r, seq in self.running.items() if seq.cancelled]:
                    self.leave(row)
                if self.running:
                    rows = list(self.running)
                    self.guard(rows, self.decode, rows)

    def guard(self, rows, step, *args):
        """step(*args); if it fails (a bug, out of memory), end the sequences in rows with the error and go on."""
        try:
            step(*args)
        except Exception as e:
            message = f"the engine failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            print(f"error: {message}", file=sys.stderr)
            for row in rows:
                if row in self.running:
                    seq = self.running[row]
                    self.leave(row)
                    seq.emit(Chunk(error=message))

    def prefill(self, row):
        """Encode a new sequence's prompt into its row, alone, and sample its first token."""
        seq = self.running[row]
        seq.generator = torch.Generator(self.device)
        if seq.seed is None:
            seq.generator.seed()
        else:
            seq.generator.manual_seed(seq.seed)
        ids = torch.tensor([seq.ids], device=self.device)
        logits = self.model(ids, start_pos=torch.zeros(1, dtype=torch.long, device=self.device),
                            rows=torch.tensor([row], device=self.device))[0][0].float()  # [P, V]
        seq.pos = len(seq.ids)
        if self.depth:  # the trunk's states the MTP modules have not read: all of them
            seq.hidden, seq.mtp_pos = self.model.hidden[0], 0
        chunk = Chunk()
        if seq.echo and seq.logprobs is not None:
            chunk.logprobs = [(seq.ids[0], None, None)] + scored(logits[:-1], ids[0, 1:], seq.logprobs)
        if seq.max_tokens == 0:
            chunk.finish_reason = "length"
            self.leave(row)
            seq.emit(chunk)
            return
        if not self.advance(row, seq, self.pick([seq], logits[-1:])[0], logits[-1], chunk) and self.depth:
            self.draft([row])

    def decode(self, rows):
        """One step for every running sequence: feed each its last token at its own position."""
        if self.depth:
            return self.speculate(rows)
        seqs = [self.running[r] for r in rows]
        idx = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)
        logits = self.model(idx, start_pos=pos, rows=torch.tensor(rows, device=self.device))[0][:, -1].float()
        for row, seq, token, row_logits in zip(rows, seqs, self.pick(seqs, logits), logits):
            seq.pos += 1
            self.advance(row, seq, token, row_logits, Chunk())

    def speculate(self, rows):
        """decode's step with drafts: one trunk forward over each row's last token and its drafts, at the row's
        own position, right-padded to the most drafts of any row; each row keeps its own prefix of its drafts
        (model.verify, with its settings and generator) and its tokens go through advance() one by one, up to
        the first that ends it; then the rows still running draft their next tokens. A padded entry goes into
        the row's cache past its valid positions, where the row's next forward overwrites it before any of its
        queries can see it (causal_mask). A row at the context's edge has no drafts (draft) and may have no room
        for the padding either: such rows get a forward of their own."""
        most = max(len(self.running[r].drafts) for r in rows)
        fit = [r for r in rows if self.running[r].pos + most < self.context]
        for group in (fit, [r for r in rows if r not in fit]):
            if group:
                self.verify_rows(group)
        self.draft([r for r in rows if r in self.running])

    def verify_rows(self, rows):
        """speculate()'s verifying forward for rows, and what each of them keeps."""
        seqs = [self.running[r] for r in rows]
        most = max(len(s.drafts) for s in seqs)
        idx = torch.tensor([[s.tokens[-1], *s.drafts] + [s.tokens[-1]] * (most - len(s.drafts)) for s in seqs],
                           device=self.device)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)
        # [B, 1 + most, V]: the model's distributions after each row's last token and after each of its drafts
        logits = self.model(idx, start_pos=pos, rows=torch.tensor(rows, device=self.device))[0].float()
        hidden = self.model.hidden
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            k = len(seq.drafts)
            drafts = torch.tensor([seq.drafts], dtype=torch.long, device=self.device)
            tokens, kept = verify(logits[i:i + 1, :k + 1], drafts, seq.q[None], seq.temperature, seq.top_k or None,
                                  seq.top_p, seq.generator)
            kept = int(kept)
            self.speculation["drafted"] += k
            self.speculation["accepted"] += kept
            seq.hidden = torch.cat([seq.hidden, hidden[i, :kept + 1]])
            if k:
                seq.mtp_pos = mtp_valid(seq.pos, kept, self.depth)
            start = seq.pos
            for j, token in enumerate(tokens[0, :kept + 1].tolist()):
                seq.pos = start + 1 + j  # the token before this one is in the cache
                if self.advance(row, seq, token, logits[i, j], Chunk()):
                    break
            seq.hidden = seq.hidden[len(seq.hidden) - (seq.pos - seq.mtp_pos):]

    def draft(self, rows):
        """The next drafts of the sequences in rows (model.draft, the rows right-padded to the most trunk states
        any of them has not given the MTP modules yet): mtp_depth tokens each, none for a row whose drafts would
        pass the context (as in model.speculative_stream)."""
        for row in rows:
            self.running[row].drafts, self.running[row].q = [], torch.zeros(0, self.model.cfg.vocab_size,
                                                                            device=self.device)
        rows = [r for r in rows if self.running[r].pos + self.depth < self.context]
        if not rows:
            return
        seqs = [self.running[r] for r in rows]
        # n = pos - mtp_pos: all the prompt's positions at the prefill (drafted alone), else mtp_depth or
        # mtp_depth + 1, so that a row's padding ends at or before its pos, inside the context
        n = [len(s.hidden) for s in seqs]
        S = max(n)
        hidden = torch.stack([torch.cat([s.hidden, s.hidden.new_zeros(S - len(s.hidden), s.hidden.size(1))])
                              for s in seqs])
        tokens = torch.tensor([(s.ids + s.tokens)[-m:] + [0] * (S - m) for s, m in zip(seqs, n)], device=self.device)
        drafts, q = self.model.draft(hidden, tokens, torch.tensor([s.mtp_pos for s in seqs], device=self.device),
                                     self.depth, self.drawer(seqs), torch.tensor(n, device=self.device),
                                     torch.tensor(rows, device=self.device))
        for seq, d, p in zip(seqs, drafts.tolist(), q):
            seq.drafts, seq.q = d, p

    def drawer(self, seqs):
        """model.draft's pick for seqs: each row's token drawn with its own settings and generator."""
        def pick(logits):
            tokens, p = zip(*(draw(logits[i:i + 1], s.temperature, s.top_k or None, s.top_p, s.generator)
                              for i, s in enumerate(seqs)))
            return torch.cat(tokens), torch.cat(p)
        return pick

    def pick(self, seqs, logits):
        """Each sequence's next token from its row of logits [B, V], with its own settings and generator."""
        return torch.cat([sample(logits[i:i + 1], s.temperature, s.top_k or None, s.top_p, s.generator)
                          for i, s in enumerate(seqs)]).flatten().tolist()

    def advance(self, row, seq, token, logits, chunk):
        """Append token to seq, emit the text that is certain by now, and free the row when seq has ended:
        at the end-of-text token or a stop string ('stop'), at max_tokens or a full context ('length').
        Returns whether it has ended."""
        seq.tokens.append(token)
        if seq.logprobs is not None:
            chunk.logprobs += scored(logits[None], torch.tensor([token], device=self.device), seq.logprobs)
        eot = token == self.tok.eot
        text = self.tok.decode(seq.tokens[:-1] if eot else seq.tokens)
        cut = min((i for i in (text.find(s, seq.shown) for s in seq.stop) if i >= 0), default=-1)
        if eot or cut >= 0:
            chunk.finish_reason, text = "stop", text[:cut] if cut >= 0 else text
        elif len(seq.tokens) == seq.max_tokens or seq.pos == self.context:  # a full cache cannot take token
            chunk.finish_reason = "length"
        end = len(text)
        if not chunk.finish_reason:  # hold back half a UTF-8 character, and what may be the start of a stop string
            end = max(seq.shown, len(text.rstrip("\ufffd")) - held_back(text.rstrip("\ufffd"), seq.stop))
        chunk.text, seq.shown = text[seq.shown:end], end
        if chunk.finish_reason:  # free the row first, so that a client told it has finished sees it gone
            self.leave(row)
        if chunk.text or chunk.logprobs or chunk.finish_reason:
            seq.emit(chunk)
        return bool(chunk.finish_reason)

    def leave(self, row):
        with self.cv:
            del self.running[row]
            self.free.append(row)


def scored(logits, targets, k):
    """[(target id, its logprob, {id: logprob} of the k most likely ids)] for logits [N, V], targets [N]."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    top = [dict(zip(i, v)) for v, i in zip(*(t.tolist() for t in logp.topk(k, -1)))]
    return list(zip(targets.tolist(), chosen, top))


def held_back(text, stops):
    """Characters at the end of text that may be the start of one of the stop strings."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
