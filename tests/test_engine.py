"""engine.py with speculative decoding: the MTP modules draft for every row of a continuously batched step, each
row keeps its own drafts and draws from its own generator. Greedy text is plain decoding's, a seeded request's
text does not depend on the batch, sampling keeps the model's distribution, and the MTP caches stay in step."""
import random
import threading

import pytest
import torch

import generate as G
from engine import Engine, Sequence
from generate import Drafting, Sampling
from test_model import SPECULATIVE, continuations, drafting_model, five_token_model, outcome, total_variation, \
    tv_bound, uncached_drafts
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TOK = Tokenizer("char", 61, None, lambda ids: "".join(chr(33 + i) for i in ids))  # one printable character per id


class Switching:
    """A drafting policy that turns drafting on and off in a fixed pattern of runs, whatever it pays."""
    pattern = (1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0)

    def __init__(self, pattern=pattern):
        self.pattern, self.steps, self.switches = pattern, 0, 0

    def drafts(self, batch):
        self.steps += 1
        self.switches += self.pattern[self.steps % len(self.pattern)] != self.pattern[(self.steps - 1) % len(self.pattern)]
        return bool(self.pattern[self.steps % len(self.pattern)])

    def measured(self, *args):
        pass


def complete(model, requests, speculative, max_batch=8, started=lambda engine: None, policy=None, drafts=None):
    """Run requests [(prompt ids, max_tokens, Sequence settings)] through one engine, submitted together (after
    started(engine)) -> ([(generated ids, text, finish_reason, logprobs)] in request order, the engine's
    speculation counts). Speculative engines draft at every step unless policy says otherwise (the default
    policy's choice depends on the machine's timings)."""
    engine = Engine(model, TOK, max_batch=max_batch, max_queue=len(requests), speculative=speculative,
                    policy=policy or Switching((1,)), drafts=drafts)
    finished = threading.Semaphore(0)
    started(engine)
    chunks = [[] for _ in requests]

    def emit(i, chunk):
        chunks[i].append(chunk)
        if chunk.finish_reason or chunk.error:
            finished.release()
    settings = {"temperature", "top_k", "top_p"}
    seqs = [Sequence(ids, n, lambda c, i=i: emit(i, c), Sampling(**{k: v for k, v in kw.items() if k in settings}),
                     **{k: v for k, v in kw.items() if k not in settings}) for i, (ids, n, kw) in enumerate(requests)]
    engine.submit(seqs)
    for _ in seqs:
        assert finished.acquire(timeout=120), "timed out"
    engine.close()
    assert not any(c.error for cs in chunks for c in cs), [c.error for cs in chunks for c in cs if c.error]
    return [(s.tokens, "".join(c.text for c in cs), cs[-1].finish_reason, [e for c in cs for e in c.logprobs])
            for s, cs in zip(seqs, chunks)], engine.drafting


def same_logprobs(a, b):
    """Two lists of (id, logprob, {id: logprob}) agree: the same ids, the numbers within rounding."""
    return len(a) == len(b) and all(
        i == j and abs(x - y) < 1e-4 and top.keys() == other.keys() and
        all(abs(top[k] - other[k]) < 1e-4 for k in top) for (i, x, top), (j, y, other) in zip(a, b))


@pytest.mark.parametrize("kw", SPECULATIVE.values(), ids=SPECULATIVE.keys())
def test_speculative_greedy_text_is_plain_greedy_text_for_every_row_of_a_ragged_batch(kw):
    # 8 prompts of 1 to 32 tokens (the context) decode together; the longer ones slide past the context's edge,
    # each row on its own; some stop at max_tokens in the middle of a step, one at a stop string
    model = drafting_model(**kw)
    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [1, 5, 12, 20, 29, 30, 31, 32], [40, 3, 7, 40, 40, 40, 40, 40]
    requests = [(torch.randint(0, 61, (n,), generator=g).tolist(), m, dict(temperature=0, logprobs=i % 2 * 2 or None))
                for i, (n, m) in enumerate(zip(lengths, max_tokens))]  # logprobs on every other one
    plain, _ = complete(model, requests, speculative=False)
    stop = plain[0][1][10:12]  # a stop string for the first request, 10 tokens in
    requests[0][2]["stop"] = (stop,)
    together, counts = complete(model, requests, speculative=True)
    alone, counts_alone = complete(model, requests, speculative=True, max_batch=1)  # one after another
    staggered, counts_staggered = complete(model, requests, speculative=True, max_batch=3)  # join as others leave
    expected = [(plain[0][1][:plain[0][1].index(stop)], "stop")] + [(text, reason) for _, text, reason, _ in plain[1:]]
    for run in (together, alone, staggered):
        assert [(text, reason) for _, text, reason, _ in run] == expected
        assert all(same_logprobs(a[3], b[3]) for a, b in zip(run[1:], plain[1:]))
    assert [reason for _, reason in expected] == ["stop"] + ["length"] * 7
    assert [len(t) for t, _, _, _ in plain[4:]] == [40] * 4  # past the context's edge: no row ends there
    # each row keeps its own number of drafts: what a row drafts and keeps does not depend on the batch
    assert counts == counts_alone == counts_staggered and 0 < counts["accepted"] < counts["drafted"]


def test_a_seeded_request_samples_the_same_text_alone_and_among_others():
    model = drafting_model(mtp_depth=2)
    g = torch.Generator().manual_seed(2)
    seeded = ([5, 17, 3, 40, 22], 24, dict(temperature=1.0, seed=7))
    others = [(torch.randint(0, 61, (n,), generator=g).tolist(), m, dict(temperature=t, top_k=k, top_p=p, seed=n))
              for n, m, t, k, p in [(3, 20, 0.8, 0, 1.0), (9, 25, 0, 0, 1.0), (14, 12, 1.2, 10, 1.0),
                                    (2, 30, 1.0, 0, 0.9), (20, 10, 0.5, 3, 1.0), (7, 28, 1.0, 0, 1.0)]]
    (alone, *_), _ = complete(model, [seeded], speculative=True)
    together, counts = complete(model, [others[0], others[1], seeded, *others[2:]], speculative=True)
    assert together[2][:3] == alone[:3] and len(alone[0]) == 24
    assert len({text for _, text, _, _ in together}) == 7 and 0 < counts["accepted"] < counts["drafted"]


def test_speculative_sampling_in_the_engine_draws_from_the_models_distribution():
    # the 5-token model of test_model: p(t1, t2, t3 | prompt) enumerated under plain sampling; the engine draws
    # 2000 seeded continuations of that prompt, decoded among as many of another prompt at other settings (a
    # row that read another's drafts or distributions would draw from the wrong one). t1 comes from the
    # prefill, t2 from the first verifying step, t3 from it or from the next, whose drafts were made in a batch
    model = five_token_model()
    settings = [([1, 3, 0, 2], dict(temperature=0.8, top_k=4, top_p=0.95)), ([4, 4, 1], dict(temperature=1.3))]
    N = 2000
    requests = [(ids, 3, dict(kw, seed=i)) for i in range(N) for ids, kw in settings]
    done, counts = complete(model, requests, speculative=True, max_batch=64)
    assert 0 < counts["accepted"] < counts["drafted"]
    for j, (ids, kw) in enumerate(settings):
        exact = continuations(model, torch.tensor([ids]), 3, **kw)
        out = outcome(torch.tensor([tokens for tokens, _, _, _ in done[j::2]]))
        assert exact[out].min() > 0  # nothing outside top-k and top-p
        assert total_variation(out, exact) < tv_bound(int((exact > 0).sum()), N)


def test_one_token_prompts_decode_with_three_mtp_depths_whose_first_drafts_may_all_be_rejected():
    # a 1-token prompt's MTP caches hold position 0 only, whose entries at depths 2 and 3 read drafts: when
    # none is kept drafting restarts at position 0 (generate.mtp_valid); at -1 it drew from NaNs, failing the batch
    model = drafting_model(mtp_depth=3)
    done, counts = complete(model, [([t], 8, dict(temperature=1.0, seed=t)) for t in range(0, 61, 3)],
                            speculative=True)
    assert [len(tokens) for tokens, _, _, _ in done] == [8] * 21 and 0 < counts["accepted"] < counts["drafted"]


@pytest.mark.parametrize("depth, drafts, pattern, longer", [
    (3, None, None, 1), (3, None, Switching.pattern, 1), (1, 1, (0,) * 14 + (1, 1, 0, 1, 1, 1), 2),
    (1, 3, Switching.pattern, 1)], ids=["always", "switching", "long-pauses", "chained"])
def test_the_engines_drafts_come_from_the_mtp_modules_run_over_each_rows_whole_window(monkeypatch, depth, drafts,
                                                                                      pattern, longer):
    # the MTP caches of every row stay in step with its trunk's, through ragged, padded steps and rejected
    # drafts: each row's drafts are drawn from what the modules predict without a cache over its whole window,
    # under the row's own sampling settings; also when the engine turns drafting off and on, the rows catching
    # up on the states they missed, after pauses longer than the 32-token context at depth 1 (where only the
    # last window's states count), and with drafts past the modules (the last chained, each row at its position)
    model = drafting_model(mtp_depth=depth)
    with torch.no_grad():  # the modules read the states they are given too (a chained draft's, its module's own)
        for m in model.mtp:
            m.eh_proj.weight[:, model.cfg.n_embd:].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    calls, draft = [], G.Decoder.draft

    def spy(decoder, rows):
        draft(decoder, rows)
        for row in rows:  # each row's window: its positions 0.. up to its last token
            state = decoder.rows[row]
            calls.append((torch.tensor([state.tokens]), torch.tensor([state.drafts]), state.q[None], len(rows),
                          state.sampling))
    monkeypatch.setattr(G.Decoder, "draft", spy)
    g = torch.Generator().manual_seed(3)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.5, top_p=0.9),
                dict(temperature=1.0, top_k=2), dict(temperature=0.5), dict(temperature=2.0), dict(temperature=1.2)]
    requests = [(torch.randint(0, 61, (n,), generator=g).tolist(), m, dict(kw, seed=i))  # each row its own settings
                for i, ((n, m), kw) in enumerate(zip([(1, 25), (1, 20), (1, 15), (6, 12), (11, 20), (17, 9), (24, 6)],
                                                     settings))]
    requests = [(ids, m * longer, kw) for ids, m, kw in requests]
    _, counts = complete(model, requests, speculative=True, policy=pattern and Switching(pattern), drafts=drafts)
    assert 0 < counts["accepted"] < counts["drafted"] and len(calls) > 8
    assert max(batch for _, _, _, batch, _ in calls) == 7  # the decoding steps drafted for all the rows at once
    with torch.no_grad():
        for window, row_drafts, q, _, sampling in calls:
            assert row_drafts.size(1) == (drafts or depth)
            assert torch.allclose(uncached_drafts(model, window, row_drafts, sampling), q[0], atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_text_is_plain_text_while_the_engine_turns_drafting_on_and_off(depth):
    # between steps the policy turns drafting off (rows step plainly, their drafts verified first) and on (their
    # MTP caches catch up on the states they missed), with rows joining as others leave and sliding past the
    # 32-token context
    model = drafting_model(mtp_depth=depth)
    g = torch.Generator().manual_seed(4)
    requests = [(torch.randint(0, 61, (n,), generator=g).tolist(), m, dict(temperature=0))
                for n, m in [(1, 40), (5, 12), (20, 45), (31, 40), (9, 25), (3, 30)]]
    plain, _ = complete(model, requests, speculative=False)
    policy = Switching()
    switched, counts = complete(model, requests, speculative=True, max_batch=3, policy=policy)
    assert [tokens for tokens, *_ in switched] == [tokens for tokens, *_ in plain]
    assert policy.switches > 10 and 0 < counts["accepted"] < counts["drafted"]


def test_the_engine_drafts_at_the_batch_sizes_where_drafting_pays_and_stops_when_acceptance_falls():
    # steps timed by a cost model: plain 10 ms + 1 ms a row, speculative 14 ms + 3 ms a row (a step that switches
    # mode pays the dearer one); with 0.8 drafts kept a row, drafting yields 1.8 tokens a row for 17 ms at one
    # row (plain: 1 for 11 ms) and for 38 ms at eight (plain: 1 for 18): it pays at 1 row, not at 8; with 0.2
    # kept, at neither
    policy = Drafting()

    def share_drafted(batch, kept, steps=640):
        drafted = 0
        for _ in range(steps):
            fed = policy.last
            on = policy.drafts(batch)
            seconds = max(10 + batch, 14 + 3 * batch if fed or on else 0)
            policy.measured(batch, fed, on, seconds / 1e3, batch * (1 + kept) if fed else batch)
            drafted += on
        return drafted / steps
    assert share_drafted(1, 0.8) > 0.9
    assert share_drafted(8, 0.8) < 0.1
    assert share_drafted(1, 0.8) > 0.9
    assert share_drafted(1, 0.2) < 0.15


def test_the_engine_keeps_drafting_where_it_pays_though_drafts_are_kept_at_random():
    # the 12-layer MTP model at one row, measured: plain steps 8.6 ms for 1 token, drafting steps 13.6 ms for
    # 1 token and each draft kept with probability 0.8 (1.8 tokens: 132 tokens/s against 116); step times +-10%
    rng, policy, drafted = random.Random(0), Drafting(), 0
    for _ in range(2000):
        fed = policy.last
        on = policy.drafts(1)
        seconds = (13.6 if fed or on else 8.6) * rng.uniform(0.9, 1.1) / 1e3
        policy.measured(1, fed, on, seconds, 1 + (rng.random() < 0.8) if fed else 1)
        drafted += on
    assert drafted / 2000 > 0.8
