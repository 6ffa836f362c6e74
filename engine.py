"""
The serving engine: one thread owns the model and decodes every running sequence in one forward pass per
step (continuous batching), through generate.Decoder, the decoder sample.py uses too. Sequences that arrive
while others decode are prefilled together into free rows of the KV cache and join the batch at the next
step; one that ends, or whose client cancelled it, leaves its row at the next step. Each row sits at its own
position and samples with its own settings (generate.Sampling) and torch.Generator, so what a request gets
never depends on what else is in the batch.

    engine = Engine(model, tok, max_batch=8, max_queue=64, ctx=lambda: autocast(device, dtype))
    engine.submit([Sequence(ids, max_tokens=50, emit=print, sampling=Sampling(temperature=0))])  # emit(Chunk)

Every row slides past the model's block_size as sample.py does (generate.py): a sequence ends at max_tokens
('length'), at the end-of-text token or a stop string ('stop'), never because its context is full.

With speculative=True the model's MTP modules draft tokens after each sequence's last one (V3 report, sec.
5.4.3; `drafts` of them, the last module chained past mtp_depth): one forward of the trunk verifies every row's
drafts at the row's own position, and each row keeps its own prefix of its drafts, so a step adds 1 to drafts + 1
tokens to each sequence: greedy the
text of plain decoding, sampled the same distribution. engine.drafting counts the drafts verified and kept.
Drafting costs the MTP modules and a wider verify forward; with many rows the verify forward is no longer
nearly free, so the engine drafts only while it pays (generate.Drafting: measured tokens per second in each
mode).
"""
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from generate import Decoder, Drafting, Sampling, settled


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
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None  # None: a fresh random seed
    stop: tuple = ()  # strings that end the text, which stops before them
    logprobs: int | None = None  # k: each new token's logprob and its k most likely alternatives
    echo: bool = False  # with logprobs: the prompt tokens' logprobs too
    tokens: list = field(default_factory=list)  # generated so far (the engine's, like what follows)
    cancelled: bool = False
    text: object = None  # tok.text(): the generated text so far
    shown: int = 0  # characters of text emitted


class Engine:
    def __init__(self, model, tok, max_batch=8, max_queue=64, ctx=nullcontext, speculative=False, policy=None,
                 threads=0, drafts=None):
        """ctx() is the context the engine thread runs the model in (autocast); max_queue the sequences that
        may wait for one of the max_batch rows before submit refuses more; speculative: draft with the model's
        MTP modules (it needs mtp_depth >= 1) at the steps where policy (default: a Drafting()) says it pays,
        `drafts` tokens a step (None: mtp_depth; more chain the last module, generate.Decoder); threads: the CPU threads of the engine thread's parallel ops (0: torch's setting when the thread
        starts)."""
        self.decoder = Decoder(model, max_batch, speculative, drafts)
        self.drafting = self.decoder.drafting  # {"drafted": drafts verified, "accepted": drafts kept}
        self.policy = (policy or Drafting()) if speculative else None
        self.tok, self.ctx, self.max_batch, self.max_queue = tok, ctx, max_batch, max_queue
        self.device = model.head.weight.device
        self.waiting, self.running, self.free = deque(), {}, list(range(max_batch))  # running: row -> Sequence
        self.cv, self.closed, self.threads = threading.Condition(), False, threads
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
        if self.threads:  # torch's thread count is each thread's own (OpenMP's); set here, it is this thread's
            torch.set_num_threads(self.threads)
        with torch.no_grad(), self.ctx(), self.decoder:  # the caches in the autocast dtype
            while True:
                with self.cv:
                    self.cv.wait_for(lambda: self.closed or self.running or (self.waiting and self.free))
                    if self.closed:
                        return
                    admitted = []
                    while self.waiting and self.free:
                        seq = self.waiting.popleft()
                        if not seq.cancelled:  # the lowest free row: one request alone decodes in row 0
                            row = min(self.free)
                            self.free.remove(row)
                            self.running[row] = seq
                            admitted.append(row)
                if admitted:
                    self.guard(admitted, self.prefill, admitted)
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

    def prefill(self, rows):
        """Encode new sequences' prompts into their rows, in one forward, and give each its first token."""
        seqs = [self.running[r] for r in rows]
        generators = [torch.Generator(self.device) for _ in seqs]
        for seq, generator in zip(seqs, generators):
            if seq.seed is None:
                generator.seed()
            else:
                generator.manual_seed(seq.seed)
        first, logits = self.decoder.start(rows, [s.ids for s in seqs], [s.sampling for s in seqs], generators)
        for row, seq, token, prompt_logits in zip(rows, seqs, first, logits):
            chunk, seq.text = Chunk(), self.tok.text()
            if seq.echo and seq.logprobs is not None:
                chunk.logprobs = [(seq.ids[0], None, None)] + scored(
                    prompt_logits[:-1], torch.tensor(seq.ids[1:], device=self.device), seq.logprobs)
            if seq.max_tokens == 0:
                chunk.finish_reason = "length"
                self.leave(row)
                seq.emit(chunk)
            else:
                self.advance(row, seq, token, prompt_logits[-1], chunk)

    def decode(self, rows):
        """One step of the decoder for every running sequence; each new token goes through advance(), up to the
        first that ends its sequence. With a drafting policy, the step's new tokens and its time, the engine's
        own work on them included, go to the policy."""
        decoder, t, tokens = self.decoder, time.perf_counter(), 0
        if self.policy is not None:
            decoder.speculate = self.policy.drafts(len(rows))
        new, logits = decoder.step(rows)
        for i, (row, new_tokens) in enumerate(zip(rows, new)):
            for j, token in enumerate(new_tokens):
                tokens += 1
                if self.advance(row, self.running[row], token, logits[i, j], Chunk()):
                    break
        if self.policy is not None:
            self.policy.measured(len(rows), decoder.verified, decoder.speculate, time.perf_counter() - t, tokens)

    def advance(self, row, seq, token, logits, chunk):
        """Append token to seq, emit the text that is certain by now, and free the row when seq has ended:
        at the end-of-text token or a stop string ('stop'), at max_tokens ('length'). Returns whether it has
        ended."""
        seq.tokens.append(token)
        if seq.logprobs is not None:
            chunk.logprobs += scored(logits[None], torch.tensor([token], device=self.device), seq.logprobs)
        eot, full = token == self.tok.eot, len(seq.tokens) == seq.max_tokens
        if not eot:
            seq.text.add(token)
        text = seq.text.finish() if eot or full else seq.text.text
        cut = min((i for i in (text.find(s, seq.shown) for s in seq.stop) if i >= 0), default=-1)
        if eot or cut >= 0:
            chunk.finish_reason, text = "stop", text[:cut] if cut >= 0 else text
        elif full:
            chunk.finish_reason = "length"
        end = settled(text, seq.shown, bool(chunk.finish_reason), seq.stop)
        chunk.text, seq.shown = text[seq.shown:end], end
        if chunk.finish_reason:  # free the row first, so that a client told it has finished sees it gone
            self.leave(row)
        if chunk.text or chunk.logprobs or chunk.finish_reason:
            seq.emit(chunk)
        return bool(chunk.finish_reason)

    def leave(self, row):
        self.decoder.release(row)
        with self.cv:
            del self.running[row]
            self.free.append(row)


def engine_threads():
    """The engine's CPU threads by default: one fewer than torch's (the cores), at least one, so that the HTTP side,
    which wakes for every token it streams, never displaces a thread that each of the engine's parallel ops
    waits for."""
    return max(1, torch.get_num_threads() - 1)


def scored(logits, targets, k):
    """[(target id, its logprob, {id: logprob} of the k most likely ids)] for logits [N, V], targets [N]."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    top = [dict(zip(i, v)) for v, i in zip(*(t.tolist() for t in logp.topk(k, -1)))]
    return list(zip(targets.tolist(), chosen, top))
