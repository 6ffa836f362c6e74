"""
Sampling and decoding: the one decoder that sample.py and the serving engine (engine.py) share.

    sampling = Sampling(temperature=0.8, top_k=200)
    text = generate(model, idx, 100, temperature=0.8, top_k=200)      # [B, T] -> [B, T + 100]
    with Decoder(model, rows=8, speculative=True) as decoder:          # what engine.py schedules requests onto
        first, prompt_logits = decoder.start([row], [ids], [sampling])  # prefill, the first token
        new, logits = decoder.step(rows)                                # each row's next token(s)

Sampling holds the settings (temperature, top_k, top_p, and OpenAI's presence_penalty, frequency_penalty and
logit_bias); adjust, probabilities, sample and draw apply them, and nothing else does.

The context slides, per row. The KV caches are rolling windows addressed by absolute position (model.write_cache):
position p lives in slot p % slots, a query sees the block_size positions up to its own (model.visible), and
positions count on past block_size with their RoPE angles computed for them. Decoding is then exactly the model's
forward over the whole sequence, each token seeing itself and the block_size - 1 tokens before it, however long the
text grows: not the re-encoding of the last block_size tokens from position 0, which would differ with more than one
layer (a kept token's deeper keys were computed while older tokens were still in its window). A prompt longer than
block_size keeps its last block_size tokens.

Speculative decoding (V3 report, sec. 5.4.3): each row's MTP modules draft mtp_depth tokens after its pending token
(Decoder.draft), or more with the last module run again on its own output state (drafts > mtp_depth, as vLLM and
SGLang run V3's one module for several drafts), one forward of the trunk over the pending token and the drafts gives the model's distributions
after each, and verify keeps a prefix of the drafts and draws one more token (speculative_accept): greedy, the text
of plain decoding; sampling, the same distribution. Drafting can be turned off and on between steps: stream() and
the engine draft only while it pays (Drafting).
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Sampling:
    """How a token is chosen from the model's logits."""
    temperature: float = 1.0  # 0 = greedy; below 1 sharper, above 1 flatter
    top_k: int | None = None  # sample among the top_k most likely tokens; 0 or None = all
    top_p: float = 1.0  # sample among the fewest tokens with this much probability
    presence_penalty: float = 0.0  # subtracted from the logit of each token generated at least once (OpenAI)
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated (OpenAI)
    logit_bias: dict = field(default_factory=dict)  # {token id: added to its logit} (OpenAI: -100 bans, 100 forces)

    def __post_init__(self):
        self.top_k = self.top_k or None

    @property
    def penalised(self):
        """Whether choosing needs the counts of the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)

    def key(self):
        """Equal settings, equal keys: the rows of requests with the same settings draw together."""
        return (self.temperature, self.top_k, self.top_p, self.presence_penalty, self.frequency_penalty,
                tuple(sorted(self.logit_bias.items())))


def adjust(logits, sampling, counts=None):
    """OpenAI's adjustments of the logits [..., V]: logit_bias added, and for each token j generated c[j] times
    so far (counts [..., V]; the prompt's tokens do not count) c[j] * frequency_penalty + (c[j] > 0) *
    presence_penalty subtracted."""
    if sampling.logit_bias:
        ids = torch.tensor(list(sampling.logit_bias), device=logits.device)
        bias = torch.tensor(list(sampling.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(-1, ids, bias.expand(*logits.shape[:-1], -1))
    if counts is not None and sampling.penalised:
        logits = logits - counts * sampling.frequency_penalty - (counts > 0) * sampling.presence_penalty
    return logits


def probabilities(logits, sampling, counts=None):
    """The distribution a token is drawn from, [..., V] -> [..., V]: softmax(adjusted logits / temperature)
    restricted to the top_k tokens and to the smallest set whose probability reaches top_p; at temperature 0,
    all of it on the argmax."""
    logits = adjust(logits, sampling, counts)
    if sampling.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1)))[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # keep until the mass before reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def draw(logits, sampling, generator=None, counts=None):
    """A token drawn from probabilities(), and that distribution: logits [B, V] -> (tokens [B, 1], probabilities
    [B, V]), from generator (default: torch's global one), or from a list of one generator per row."""
    p = probabilities(logits, sampling, counts)
    if sampling.temperature == 0:
        return p.argmax(-1, keepdim=True), p
    return inverse_cdf(p, generator), p


def noise(like, fill, generator=None):
    """A tensor shaped like `like` filled in place by fill(tensor, generator) from generator, or row by row from
    one generator per row (a list): rows with generators of their own draw in one batch, each from its own."""
    if isinstance(generator, list):
        return torch.stack([fill(torch.empty_like(like[0]), g) for g in generator])
    return fill(torch.empty_like(like), generator)


def inverse_cdf(p, generator=None):
    """One draw from each row of p [B, V] -> [B, 1]: the first entry whose cumulative probability passes u times
    the row's total, u ~ U[0, 1) one per row from generator or one generator per row (noise()); an entry of
    probability 0 is never drawn. One uniform a row: torch.multinomial's exponential race draws one per entry,
    which for a 50k vocabulary cost most of a sampled decoding step on a CPU (BENCHMARKS.md, section 7)."""
    c = p.cumsum(-1)
    u = noise(c[:, :1], lambda t, g: t.uniform_(generator=g), generator)
    return torch.searchsorted(c, u * c[:, -1:], right=True).clamp_(max=p.size(-1) - 1)


def sample(logits, sampling, generator=None, counts=None):
    """draw()'s token alone, logits [B, V] -> [B, 1]; greedy without building the one-hot distribution."""
    if sampling.temperature == 0:
        return adjust(logits, sampling, counts).argmax(-1, keepdim=True)
    return draw(logits, sampling, generator, counts)[0]


def verify(logits, drafts, q, sampling, generator=None, counts=None):
    """Which drafts to keep, and the token after them. logits [B, k+1, V]: the model's after the pending token
    and after each of the k drafts [B, k], which were drawn from q [B, k, V]; counts [B, V]: the tokens generated
    before the pending one and the pending one. Greedy, without drawing: a draft is kept while it is the argmax,
    and the argmax after the last kept one follows; else speculative_accept. -> (tokens [B, k+1], kept [B])."""
    if counts is not None and sampling.penalised:  # after draft i, the drafts before it count too
        seen = F.one_hot(drafts, logits.size(-1)).to(counts.dtype).cumsum(1)
        counts = counts[:, None] + torch.cat([torch.zeros_like(seen[:, :1]), seen], 1)
    if sampling.temperature == 0:
        tokens = adjust(logits, sampling, counts).argmax(-1)
        return tokens, (tokens[:, :-1] == drafts).int().cumprod(-1).sum(-1)
    return speculative_accept(probabilities(logits, sampling, counts), q, drafts, generator)


def speculative_accept(p, q, drafts, generator=None):
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft i is kept with probability
    min(1, p_i(d_i) / q_i(d_i)) while every draft before it was kept; at the first rejection the token is
    drawn from the residual max(0, p_i - q_i) normalised, and after k kept drafts from p_k. The tokens are
    then distributed exactly as draws from p one at a time (with one-hot p and q, verify()'s greedy rule).
    p: the model's probabilities [B, k+1, V] after the pending token and after each draft; q: the drafts'
    probabilities [B, k, V]; drafts: [B, k]; the uniforms and the last draw come from generator (default:
    torch's global one; a list: one per row). -> (tokens [B, k+1]: each row's kept drafts then its own draw,
    kept [B]: the number of drafts each row kept)."""
    p_d, q_d = (t.gather(-1, drafts[..., None])[..., 0] for t in (p[:, :-1], q))
    u = noise(p_d, lambda t, g: t.uniform_(generator=g), generator)
    kept = (u * q_d < p_d).int().cumprod(-1).sum(-1)  # u < p/q, with q(d) > 0 as d was drawn from q
    residual = (p[:, :-1] - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :-1])  # p == q: never rejected
    last = torch.cat([residual, p[:, -1:]], 1)[torch.arange(p.size(0), device=p.device), kept]
    own = inverse_cdf(last, generator)
    return torch.cat([drafts, own], 1).scatter(1, kept[:, None], own), kept


def mtp_valid(pos, kept, depth):
    """How many positions of the MTP caches stay valid after a step that drafted from the pending token at pos
    and kept `kept` of its drafts: depth j's entry at position i read the token at i + j, which is right if it
    was known before the step (i + j <= pos) or kept (i + j <= pos + kept); entries exist below pos."""
    return max(0, min(pos, pos + kept + 1 - depth))


def drafts_per_step(cfg, drafts=None):
    """The tokens a speculative step drafts: `drafts`, or when not given the MTP modules' mtp_depth and at least 2
    (the last module chained: BENCHMARKS.md section 3 has the 24-layer model's 1.8x with 2 against 1.45x with 1);
    attn='hybrid' (V4) its modules' alone, as its compressed caches cannot take a module's guesses ahead of the
    text. ValueError for what cannot be drafted."""
    if not cfg.mtp_depth:
        raise ValueError("speculative decoding drafts with the MTP modules: this model has mtp_depth=0")
    if drafts is None or drafts == 0:
        return cfg.mtp_depth if cfg.attn == "hybrid" else max(cfg.mtp_depth, 2)
    if drafts < 0 or (drafts > cfg.mtp_depth and cfg.attn == "hybrid"):
        raise ValueError(f"drafts={drafts}: this model drafts 1 to {cfg.mtp_depth if cfg.attn == 'hybrid' else 'any'}"
                         f" tokens a step{' (attn=hybrid: one per MTP module)' if cfg.attn == 'hybrid' else ''}")
    return drafts


@dataclass
class Row:
    """One sequence's decoding state in its row of the KV caches."""
    sampling: Sampling
    generator: torch.Generator | None  # None: torch's global one
    tokens: list  # the prompt (at most block_size) and the tokens generated; the last is pending: not yet cached
    pos: int  # positions in the trunk's cache: the pending token goes at pos
    counts: torch.Tensor | None = None  # [V] times each token was generated, for the penalties
    # speculative decoding: the MTP caches hold positions < mtp_pos; hidden [pos - mtp_pos, D] (hc_mult > 1:
    # [pos - mtp_pos, hc_mult, D]) are the trunk's states at mtp_pos..pos-1, which they have not read yet; drafts:
    # the tokens drafted after the pending one (none while the decoder does not speculate), drawn from the
    # probabilities q [len(drafts), V] (greedy rows: None, as verifying them reads none)
    mtp_pos: int = 0
    hidden: torch.Tensor | None = None
    drafts: list = field(default_factory=list)
    q: torch.Tensor | None = None


class Decoder:
    """Decoding over the rows of the model's KV caches, each row a sequence at its own position with its own
    sampling settings and generator (continuous batching: rows start and leave at any step). start() prefills
    and draws a row's first token, step() gives each of the rows it is told its next tokens: one with plain
    decoding, 1 to n_drafts + 1 with speculative=True (MTP drafts, verified by one forward) while speculate is
    on; turned off between steps, rows step plainly and the MTP modules read the states they missed when it is
    turned on again. Rows with equal sampling settings are drawn together, each from its own generator. drafting
    counts the drafts verified and kept.
    Use it as a context: entering allocates the caches (in the autocast dtype where autocast is on), leaving
    frees them."""

    def __init__(self, model, rows=1, speculative=False, drafts=None):
        self.model, self.n_rows = model, rows
        # drafts per step: one by each MTP module, the rest by the last one chained (draft_rows)
        self.n_drafts = drafts_per_step(model.cfg, drafts) if speculative else 0
        self.depth = min(self.n_drafts, model.cfg.mtp_depth)  # the MTP modules that draft
        self.device, self.window = model.head.weight.device, model.cfg.block_size
        self.vocab_size = model.cfg.vocab_size
        self.rows = {}  # cache row -> Row
        self.drafting = {"drafted": 0, "accepted": 0}
        self.speculate = bool(self.depth)  # whether start() and step() draft for the next step (stream() and the
        # engine turn it off where Drafting says it does not pay); rows without drafts step plainly and the MTP
        # modules catch up later
        self.verified = False  # whether the last step verified drafts

    def __enter__(self):
        self.model.setup_cache(self.n_rows, self.model.cache_length(self.n_drafts))
        return self

    def __exit__(self, *exc):
        self.rows.clear()
        self.model.setup_cache(0)

    def tensor(self, values):
        return torch.tensor(values, device=self.device)

    def place(self, rows, positions):
        """forward's (start_pos, rows) for rows at positions: an int and None when the rows are 0..B-1 at one
        position (sample.py's rows, one request alone in the engine), so that the caches are sliced rather
        than indexed; positions [B] and None for rows 0..B-1 at their own positions (a full engine), whose
        caches are read as views; else per-row tensors."""
        leading = rows == list(range(len(rows)))
        if leading and len(set(positions)) == 1:
            return positions[0], None
        return self.tensor(positions), None if leading else self.tensor(rows)

    @torch.no_grad()
    def start(self, rows, prompts, samplings, generators=None):
        """Prefill the prompts (lists of token ids; each keeps its last block_size) into the cache rows `rows`,
        right-padded to the longest in one forward (batches), and draw each row's first token, its pending token.
        -> (the first tokens [B], each prompt's logits [len(prompt), V] in float32)."""
        prompts = [list(p[-self.window:]) for p in prompts]
        generators = generators or [None] * len(rows)
        lengths = [len(p) for p in prompts]
        logits, hidden = [None] * len(rows), [None] * len(rows)
        for group in self.batches(lengths):
            longest = max(lengths[i] for i in group)
            start_pos, cache_rows = self.place([rows[i] for i in group], [0] * len(group))
            out = self.model(self.tensor([prompts[i] + [0] * (longest - lengths[i]) for i in group]),
                             start_pos=start_pos, rows=cache_rows)
            for j, i in enumerate(group):
                logits[i], hidden[i] = out.logits[j, :lengths[i]].float(), out.hidden[j, :lengths[i]]
        states = []
        for row, prompt, sampling, generator, states_of_prompt in zip(rows, prompts, samplings, generators, hidden):
            state = Row(sampling, generator, prompt, len(prompt))
            if sampling.penalised:
                state.counts = torch.zeros(self.vocab_size, device=self.device)
            if self.depth:  # the trunk's states the MTP modules have not read: all of them
                state.hidden = states_of_prompt
            self.rows[row] = state
            states.append(state)
        first = self.pick(states, torch.stack([row_logits[-1] for row_logits in logits])).tolist()
        for state, token in zip(states, first):
            self.append(state, [token])
        if self.depth and self.speculate:
            self.draft(rows)
        return first, logits

    def batches(self, lengths):
        """The indices of rows of these lengths that one forward can prefill, right-padded to the longest: all of
        them, where the padding lies past a row's positions, and its next steps overwrite it before its queries
        reach it (the caches of MLA and GQA hold block_size positions); for attn='hybrid', whose caches keep only
        the last positions a step reads, which a shorter row's padding would overwrite, those of each length."""
        if self.model.cfg.attn != "hybrid":
            return [list(range(len(lengths)))]
        return [[i for i, n in enumerate(lengths) if n == length] for length in sorted(set(lengths))]

    def release(self, row):
        """Forget the sequence in row: its row is free for start()."""
        self.rows.pop(row, None)

    @torch.no_grad()
    def step(self, rows):
        """One forward for rows, each feeding its pending token (and its drafts) at its own position.
        -> (each row's new tokens [B lists], logits [B, 1 + drafts, V] in float32: logits[b, j] are those the
        row's j-th new token was chosen from)."""
        states = [self.rows[r] for r in rows]
        fed = self.verified = all(state.drafts for state in states)  # drafts are verified when every row has them
        start_pos, cache_rows = self.place(list(rows), [state.pos for state in states])
        out = self.model(self.tensor([[state.tokens[-1], *(state.drafts if fed else [])] for state in states]),
                         start_pos=start_pos, rows=cache_rows)
        logits = out.logits.float()
        if fed:
            chosen = self.verify(states, logits)
            self.drafting["drafted"] += self.n_drafts * len(states)
            self.drafting["accepted"] += sum(kept for _, kept in chosen)
        else:
            chosen = [([token], 0) for token in self.pick(states, logits[:, -1]).tolist()]
        new = []
        for i, (state, (tokens, kept)) in enumerate(zip(states, chosen)):
            new.append(tokens[:kept + 1])
            if self.depth:
                self.follow(state, out.hidden[i, :kept + 1], kept)
            state.pos += kept + 1
            self.append(state, new[-1])
        if self.depth and self.speculate:
            self.draft(rows)
        return new, logits

    def follow(self, state, hidden, kept):
        """Keep the trunk's states [kept + 1, D] of a step for the MTP modules, which read those they have not read
        yet when they next draft. After a draft the MTP caches hold what mtp_valid says; without one they gain
        nothing. A backlog longer than the window (steps without drafting) keeps its last block_size states: the
        last query sees no further back, and a module's keys depend on its position's inputs alone, so depth 1
        drafts as if it had read them all (deeper modules read queries that saw the older ones)."""
        if state.drafts:
            state.mtp_pos = mtp_valid(state.pos, kept, self.depth)
        hidden = torch.cat([state.hidden, hidden])
        state.mtp_pos = max(state.mtp_pos, state.pos + kept + 1 - self.window)
        state.hidden = hidden[len(hidden) - (state.pos + kept + 1 - state.mtp_pos):]
        state.drafts, state.q = [], None

    def append(self, state, tokens):
        state.tokens += tokens
        if state.counts is not None:
            state.counts.index_add_(0, self.tensor(tokens), torch.ones(len(tokens), device=self.device))

    def by_settings(self, states, function, *inputs):
        """function(sampling, generator, index, *inputs[index]) -> tensors, for each group of the states (at index)
        with equal sampling settings, which draw together: generator is the group's, or a list of one per row
        where its rows have their own (the engine's requests); the results put back in the order of the states.
        A step of the engine's requests samples in one batch, not one call a row."""
        groups = {}
        for i, state in enumerate(states):
            groups.setdefault(state.sampling.key(), []).append(i)

        def run(index, *rows):
            generators = [states[i].generator for i in index]
            shared = all(g is generators[0] for g in generators)
            return function(states[index[0]].sampling, generators[0] if shared else generators, index, *rows)
        if len(groups) == 1:
            return run(list(range(len(states))), *inputs)
        results = [(index, run(index, *(x[index] for x in inputs))) for index in groups.values()]
        outputs = [r.new_empty(len(states), *r.shape[1:]) for r in results[0][1]]
        for index, result in results:
            for out, r in zip(outputs, result):
                out[index] = r
        return outputs

    def counts(self, states, index, drafts=None):
        """The generated-token counts [len(index), V] of states[index], the drafts [B, j] so far included, for
        penalties; None without them."""
        if states[index[0]].counts is None:
            return None
        counts = torch.stack([states[i].counts for i in index])
        if drafts is not None and drafts.size(1):
            counts = counts + F.one_hot(drafts[index], self.vocab_size).sum(1)
        return counts

    def choose(self, states, logits, drafts=None):
        """Each state's token drawn from its row of logits [B, V] with its settings and generator -> (tokens [B],
        the probabilities they were drawn from [B, V]); drafts [B, j]: drafted tokens that count for penalties."""
        tokens, probs = self.by_settings(states, lambda sampling, generator, index, logits: draw(
            logits, sampling, generator, self.counts(states, index, drafts)), logits)
        return tokens[:, 0], probs

    def pick(self, states, logits, drafts=None):
        """choose()'s tokens [B] alone: what verifying does not need, the probabilities (greedy, a [B, V] one-hot
        distribution per step), is not built."""
        tokens, = self.by_settings(states, lambda sampling, generator, index, logits: (sample(
            logits, sampling, generator, self.counts(states, index, drafts)),), logits)
        return tokens[:, 0]

    def verify(self, states, logits):
        """verify() for each state: [(the tokens kept and drawn [n_drafts + 1], the number of drafts kept)]."""
        drafts, q = self.tensor([state.drafts for state in states]), [state.q for state in states]
        q = torch.stack([logits[i, 1:] if t is None else t for i, t in enumerate(q)])  # greedy rows keep none
        tokens, kept = self.by_settings(states, lambda sampling, generator, index, *rows: verify(
            *rows, sampling, generator, self.counts(states, index)), logits, drafts, q)
        return list(zip(tokens.tolist(), kept.tolist()))

    def draft(self, rows):
        """draft_rows() for rows, in groups whose right-padding stays short: a row padded by more than
        max(mtp_depth, n_drafts) positions past its last real one would write them over the slots of its own window in the rolling MTP
        caches (rows that catch up after steps without drafting, beside rows that drafted at the last step)."""
        backlog = {r: len(self.rows[r].hidden) for r in rows}
        if self.model.cfg.attn == "hybrid":  # caches of the last positions only: rows with as many states (batches)
            for group in self.batches(list(backlog.values())):
                self.draft_rows([rows[i] for i in group])
            return
        longest, slots = max(backlog.values()), self.model.cache_length(self.n_drafts)
        room = slots - self.window - 1  # positions a step may write past a row's last: max(mtp_depth, n_drafts)
        fits = [r for r in rows if longest - backlog[r] <= room or self.rows[r].mtp_pos + longest <= slots]
        if len(fits) == len(rows):
            return self.draft_rows(rows)
        for r in sorted(rows, key=backlog.get, reverse=True):  # longest first: each row alone beside its peers
            if r in backlog:
                group = [s for s in rows if s in backlog and backlog[r] - backlog[s] <= room]
                self.draft_rows(group)
                for s in group:
                    del backlog[s]

    def draft_rows(self, rows):
        """n_drafts drafts after each row's pending token, by the MTP modules. Depth j reads the trunk's states
        (depth j-1's for j > 1) at the positions mtp_pos.. its cache lacks and the embeddings of the tokens j
        ahead, extends its cache, and draws draft j from its last real position with the row's settings; depth
        j+1 reads that draft as its last token. Drafts past the modules chain the last one: it reads its own
        output state at the position before as the trunk's and the draft before as the token, one position
        further each time; those cache entries are guesses, which mtp_valid never counts as valid. The rows are
        right-padded to the most states any has not given the MTP modules (all of a prompt's after start, those of
        the steps since the last draft, else 1 to n_drafts + 1); a row's padding goes past its real positions, where its next draft overwrites it before
        any of its queries can see it (draft() keeps it short enough)."""
        model, depth = self.model, self.depth
        states = [self.rows[r] for r in rows]
        lengths = [len(state.hidden) for state in states]
        longest = max(lengths)
        hidden = torch.stack([torch.cat([state.hidden, state.hidden.new_zeros(longest - n, *state.hidden.shape[1:])])
                              for state, n in zip(states, lengths)])  # [T, D], or hc_mult streams [T, N, D]
        # the tokens one position later than the states, the last the pending token, then room for the drafts
        tokens = self.tensor([state.tokens[len(state.tokens) - n:] + [0] * (longest - n + depth)
                              for state, n in zip(states, lengths)])
        start, cache_rows = self.place(list(rows), [state.mtp_pos for state in states])
        batch, last = self.tensor(range(len(rows))), self.tensor(lengths) - 1
        cos, sin = model.rope(start, longest)
        drafts, q = tokens.new_zeros(len(rows), 0), []
        greedy = all(state.sampling.temperature == 0 for state in states)  # verify() needs no q: none is built

        def draw_draft(out):  # the next draft of each row from the MTP output [B, D] at its last position
            nonlocal drafts
            logits = model.draft_head(out).float()
            token, p = (self.pick(states, logits, drafts), None) if greedy else self.choose(states, logits, drafts)
            drafts = torch.cat([drafts, token[:, None]], 1)
            q.append(p)
            return token
        for j, module in enumerate(model.mtp[:depth]):
            hidden, out = module(hidden, model.embed(tokens[:, j:j + longest]), cos, sin, start, cache_rows)
            tokens[batch, last + j + 1] = draw_draft(out[batch, last])
        hidden = hidden[batch, last][:, None]
        for ahead in range(self.n_drafts - depth):  # the last module chained, at each row's next position
            start, cache_rows = self.place(list(rows), [s.mtp_pos + n + ahead for s, n in zip(states, lengths)])
            hidden, out = module(hidden, model.embed(drafts[:, -1:]), *model.rope(start, 1), start, cache_rows)
            draw_draft(out[:, 0])
        q = None if greedy else torch.stack(q, 1)
        for i, (state, row_drafts) in enumerate(zip(states, drafts.tolist())):
            state.drafts, state.q = row_drafts, None if q is None else q[i]


class Drafting:
    """Whether a Decoder's next step drafts (speculative=True; stream() and the engine ask it): drafting must yield
    more tokens per second than plain steps at the batch size at hand. Each mode's rate at a batch size is the
    new tokens of its steps over their seconds, the caller's work on the tokens included (moving averages of
    both); what drafting buys (the drafts kept) and costs (the MTP modules, the wider verifying forward, more
    tokens to handle) is in it, so nothing is modelled. A step that switches mode is not measured (it pays the
    MTP modules' catch-up). What is not measured is measured by `probe` steps of its mode: at a batch size that
    has one mode's rate and not the other's, and every `every` steps the mode not taken, as acceptance changes
    with the text. A batch size with neither takes the nearest measured one's verdict; until there is one, the
    steps alternate between the modes."""

    def __init__(self, every=64, probe=3, weight=0.05):
        # weight: of a new step in the averages, at least 1/n for a mode's n-th step. A drafting step makes 1 to
        # drafts + 1 tokens a row at random: with too short a memory a mode seen a few unlucky steps is not tried again for
        # `every` steps, and drafting stays off where it pays (BENCHMARKS.md, section 3)
        self.every, self.probe, self.weight = every, probe, weight
        self.sums = {}  # (batch size, drafting) -> [tokens, seconds, steps], moving averages per step
        self.last, self.steps, self.probing = False, 0, 0
        self.steps_taken = {False: 0, True: 0}  # steps by whether they drafted

    def pays(self, batch):
        """Whether drafting pays at this batch size (or the nearest measured in both modes); None: unknown."""
        known = [b for b, drafting in self.sums if drafting and (b, False) in self.sums]
        if not known:
            return None
        b = min(known, key=lambda b: (abs(b - batch), b))
        (spec_tokens, spec_s, _), (plain_tokens, plain_s, _) = self.sums[b, True], self.sums[b, False]
        return spec_tokens * plain_s > plain_tokens * spec_s

    def drafts(self, batch):
        """Whether the step about to run for batch rows drafts for the next one."""
        if self.probing:
            self.probing -= 1
        else:
            missing = [mode for mode in (True, False) if (batch, mode) not in self.sums]
            pays = self.pays(batch)
            if len(missing) == 1 or pays is None or self.steps >= self.every:  # measure a mode
                self.last = missing[0] if len(missing) == 1 else not self.last if pays is None else not pays
                self.probing, self.steps = self.probe - 1, 0
            else:
                self.last, self.steps = pays, self.steps + 1
        self.steps_taken[self.last] += 1
        return self.last

    def measured(self, batch, fed, drafted, seconds, tokens):
        """A step of batch rows made tokens new tokens in seconds; fed: it verified drafts, drafted: it drafted."""
        if fed == drafted:
            *old, n = self.sums.get((batch, drafted), [0, 0, 0])
            weight = max(self.weight, 1 / (n + 1))
            self.sums[batch, drafted] = [a + weight * (b - a) for a, b in zip(old, (tokens, seconds))] + [n + 1]


@torch.no_grad()
def stream(model, idx, max_new_tokens, use_cache=True, speculative=False, drafts=None, speculation=None, **sampling):
    """Yield the next token [B, 1] max_new_tokens times after the prompt idx [B, T] (its last block_size tokens),
    chosen with Sampling(**sampling) from torch's global generator. With the cache, every row decodes through one
    Decoder (speculative: with MTP drafts while they pay, Drafting, `drafts` a step; each row keeps its own), sliding past
    block_size; without, each token comes from a forward over all the tokens that can reach the last one
    (recompute), the same tokens.
    speculation: a dict whose 'drafted' and 'accepted' counts grow by the drafts verified and kept."""
    settings = Sampling(**sampling)
    idx = idx[:, -model.cfg.block_size:]
    if not use_cache:
        yield from recompute(model, idx, max_new_tokens, settings)
        return
    rows, policy = list(range(idx.size(0))), Drafting() if speculative else None
    with Decoder(model, len(rows), speculative, drafts) as decoder:
        try:
            first, _ = decoder.start(rows, idx.tolist(), [settings] * len(rows))
            new = [[token] for token in first]
            for n in range(max_new_tokens):
                while any(len(new[r]) <= n for r in rows):  # with drafts, rows keep different numbers of tokens:
                    # every row short of the end steps, so that the batch stays whole and no row waits for another
                    going = [r for r in rows if len(new[r]) < max_new_tokens]
                    if policy:
                        decoder.speculate, t = policy.drafts(len(going)), time.perf_counter()
                    stepped = decoder.step(going)[0]
                    for r, tokens in zip(going, stepped):
                        new[r] += tokens
                    if policy:
                        policy.measured(len(going), decoder.verified, decoder.speculate, time.perf_counter() - t,
                                        sum(map(len, stepped)))
                yield torch.tensor([[tokens[n]] for tokens in new], device=idx.device)
        finally:
            if speculation is not None:
                for key in speculation:
                    speculation[key] += decoder.drafting[key]


def recompute(model, idx, max_new_tokens, sampling):
    """stream() without a cache: each token from a forward over the last n_layer * (block_size - 1) + 1 tokens,
    every one whose embedding reaches the last token's logits through the banded attention (each layer reaches
    block_size - 1 further back): the logits of the cached decode. attn='hybrid' reads every token: its compressed
    entries pool windows at fixed absolute positions, which a crop would shift."""
    reach = 0 if model.cfg.attn == "hybrid" else model.cfg.n_layer * (model.cfg.block_size - 1) + 1
    counts = torch.zeros(idx.size(0), model.cfg.vocab_size, device=idx.device) if sampling.penalised else None
    for _ in range(max_new_tokens):
        token = sample(model(idx[:, -reach:]).logits[:, -1].float(), sampling, None, counts)
        if counts is not None:
            counts.scatter_add_(1, token, torch.ones_like(token, dtype=counts.dtype))
        idx = torch.cat([idx, token], 1)
        yield token


def generate(model, idx, max_new_tokens, **options):
    """idx [B, T] followed by max_new_tokens tokens of stream(model, idx, max_new_tokens, **options)."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, **options)], 1)


def settled(text, shown, final=False, stops=()):
    """How many characters of text, the decoding of a sequence's tokens so far, are certain: all of them when
    final; before that, neither a trailing half character (U+FFFD: a byte-level token split a UTF-8 sequence
    that the next tokens complete) nor what may be the start of one of the stop strings. Never fewer than
    shown, the characters already written."""
    if final:
        return len(text)
    text = text.rstrip("\ufffd")
    held = max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
    return max(shown, len(text) - held)
