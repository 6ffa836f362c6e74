"""generate.py: decoding slides past the context with the cache, without it and with drafts alike; the sampling
settings (OpenAI's logit_bias and penalties) act as OpenAI defines them, in plain and speculative decoding."""
import pytest
import torch

import generate as G
import model as M
from generate import Sampling, generate, settled
from model import Transformer
from test_model import drafting_model, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_greedy_text_past_the_context_is_the_same_with_and_without_the_cache_and_with_drafts(attn):
    # an 8-token context, 40 new tokens: the rolling caches wrap five times, the recomputation reads every token
    # that reaches the next one (3 layers x 7 back), and the drafting decoder keeps 0 to 2 drafts per step
    model = drafting_model(block_size=8, attn=attn, n_kv_head=2, mtp_depth=2)
    x = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    speculation = {"drafted": 0, "accepted": 0}
    cached = generate(model, x, 40, temperature=0)
    assert torch.equal(cached, generate(model, x, 40, temperature=0, use_cache=False))
    assert torch.equal(cached, generate(model, x, 40, temperature=0, speculative=True, speculation=speculation))
    assert 0 < speculation["accepted"] < speculation["drafted"] and len(set(cached[0, 5:].tolist())) >= 8


def test_logit_bias_forces_or_bans_tokens_greedy_and_sampled():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 61, (2, 4))
    assert (generate(model, x, 6, temperature=1.0, logit_bias={7: 100})[:, 4:] == 7).all()
    greedy = generate(model, x, 6, temperature=0)[:, 4:]
    banned = generate(model, x, 6, temperature=0, logit_bias={t: -100 for t in greedy.flatten().tolist()})[:, 4:]
    assert not (banned[..., None] == greedy.flatten()).any()


def test_penalties_subtract_openais_terms_for_generated_tokens():
    logits, counts = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    sampling = Sampling(temperature=0.5, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={0: 1.0})
    want = torch.tensor([[2.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]])
    assert torch.allclose(G.adjust(logits, sampling, counts), want)
    assert torch.allclose(G.probabilities(logits, sampling, counts), (want / 0.5).softmax(-1))
    assert Sampling(top_k=0).top_k is None and not Sampling(logit_bias={1: 5}).penalised


@pytest.mark.parametrize("depth", [2, 1], ids=["two-modules", "one-chained"])
def test_a_presence_penalty_keeps_greedy_text_from_repeating_and_drafts_see_it_too(depth):
    # a penalty larger than any logit gap: no token is generated twice. The verifying forward and the drafts
    # count the drafts before each position (two a step, by two modules or one chained), so that speculative
    # decoding keeps plain decoding's text
    model = drafting_model(mtp_depth=depth)
    x = torch.randint(0, 61, (1, 3), generator=torch.Generator().manual_seed(0))
    settings = dict(temperature=0, presence_penalty=1000.0)
    plain = generate(model, x, 30, **settings)[0, 3:].tolist()
    assert len(set(plain)) == 30 and plain != generate(model, x, 30, temperature=0)[0, 3:].tolist()
    speculation = {"drafted": 0, "accepted": 0}
    assert generate(model, x, 30, speculative=True, speculation=speculation, **settings)[0, 3:].tolist() == plain
    assert speculation["accepted"] > 0
    assert generate(model, x, 30, use_cache=False, **settings)[0, 3:].tolist() == plain


def test_bf16_decoding_keeps_the_experts_cast_while_the_caches_live_and_decodes_as_casting_them_each_step(
        monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 61, (2, 4)).tolist()

    def decode():  # two rows (the sorted experts' path: 4 pairs for 4 experts) and one (the gathered pairs' path)
        with torch.autocast("cpu", torch.bfloat16), G.Decoder(model, 2) as decoder:
            kept = [m.experts.kept for m in model.moes]
            with torch.no_grad():  # what decoding multiplies by
                assert kept[0] is None or model.moes[0].experts.weights(torch.bfloat16) is kept[0]
            decoder.start([0, 1], x, [Sampling(temperature=0)] * 2)
            return kept, [decoder.step(rows)[1] for rows in [[0, 1]] * 4 + [[0]] * 4]
    kept, logits = decode()
    assert all(k is not None and k[0].dtype == torch.bfloat16 for k in kept)
    assert all(m.experts.kept is None for m in model.moes)  # gone with the caches
    monkeypatch.setattr(M.Experts, "keep_cast", lambda self, dtype: None)
    assert all(torch.equal(a, b) for a, b in zip(logits, decode()[1]))


def test_settled_text_holds_back_half_characters_and_the_start_of_a_stop_string():
    assert settled("ab\ufffd", 0) == 2 and settled("ab\ufffd", 0, final=True) == 3
    assert settled("hello wo", 3, stops=("world",)) == 6 and settled("hello", 5, stops=("o!",)) == 5


def test_rows_with_their_own_generators_draw_together_what_each_draws_alone_from_the_distribution():
    # the engine's rows each sample from their own seeded generator; drawn in one batch, each row's token is the
    # one it draws alone from the same generator state; draws follow p, and a token of probability 0 never comes
    p = torch.softmax(torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 2, -1)
    p[:, 7] = 0
    seeds = range(100, 106)
    together = G.inverse_cdf(p, [torch.Generator().manual_seed(s) for s in seeds])[:, 0]
    alone = [G.inverse_cdf(p[i:i + 1], torch.Generator().manual_seed(s)).item() for i, s in enumerate(seeds)]
    assert together.tolist() == alone
    draws = G.inverse_cdf(p[:1].expand(20000, -1), torch.Generator().manual_seed(1))[:, 0]
    frequencies = torch.bincount(draws, minlength=40) / 20000
    assert (frequencies - p[0]).abs().max() < 0.015 and frequencies[7] == 0
