"""
A DeepSeek-V3-style language model in one file: Multi-head Latent Attention (MLA), DeepSeekMoE with
auxiliary-loss-free balancing, Multi-Token Prediction (MTP), YaRN RoPE, and a dense Llama/SmolLM2 path.

References:
  DeepSeek-V2 report (arXiv:2405.04434): MLA, DeepSeekMoE, device-level token dropping.
  DeepSeek-V3 report (arXiv:2412.19437): sigmoid routing, bias-based balancing (sec. 2.1.2), the
  sequence-wise balance loss (eq. 17-20), MTP (sec. 2.2).
  DeepSeek-V3 inference/model.py: names of modules and parameters (wq_a, wkv_b, w1/w2/w3, ...).
  DeepSeek-V4 report (2026): manifold-constrained hyper-connections (sec. 2.2), hybrid attention with CSA and
  HCA (sec. 2.3), hash routing and sqrt-softplus scores (sec. 2.1); the V4 section below, off by default.
Shapes: B batch, T sequence, D = n_embd, H heads, E routed experts, K = n_activated_experts.
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from configurator import above, at_least, between, first_refusal, one_of, refusal

# attn: Multi-head Latent Attention (DeepSeek-V3), grouped-query attention (Llama), V4's hybrid attention
ATTENTION_KINDS = ("mla", "gqa", "hybrid")
SCORE_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")  # score_func: the router's affinities, V3's, V2's and V4's
LAYER_TYPES = ("sliding", "csa", "hca")  # layer_types of attn='hybrid': a window, + CSA, + HCA (HybridAttention)
# the float32 logits of one chunk of vocab_cross_entropy: on CPU under glibc's largest mmap threshold, so that the
# allocator reuses their pages instead of mapping fresh ones each step; elsewhere large, for large matmuls
CE_CHUNK_BYTES = {"cpu": 2 ** 24, "other": 2 ** 28}
# MoE.decode_dense's reach on a CPU: a decoding step of up to this many tokens (its rows and their drafts) whose
# pairs reach half the experts runs every expert on every token, cheaper there than gathering or sorting the pairs
DENSE_DECODE_TOKENS = 24


class ConfigError(ValueError):
    """A ModelConfig value model.py cannot build, in one line that names the key, its value and what it may be:
    the scripts print it as `error: ...` and exit with status 2."""


@dataclass
class ModelConfig:
    # trunk (nanoGPT's names)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 1024  # context length: a token attends to itself and the block_size - 1 before it
    n_layer: int = 12  # transformer blocks
    n_embd: int = 768  # model width D
    n_head: int = 12  # attention heads
    n_kv_head: int = 0  # key/value heads for gqa; 0 = n_head (multi-head)
    dropout: float = 0.0  # dropout on attention weights and residual branches
    attn: str = "mla"  # one of ATTENTION_KINDS: "mla" (Multi-head Latent Attention), "gqa" (grouped-query, Llama), "hybrid" (V4)
    tie_embeddings: bool = False  # share the token embedding with the output head (SmolLM2 does, DeepSeek does not)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    inter_dim: int = 0  # dense SwiGLU width; 0 = 8/3 * n_embd rounded up to a multiple of 64
    # Multi-head Latent Attention (DeepSeek-V3 reference names)
    q_lora_rank: int = 0  # query compression rank; 0 = plain query projection
    kv_lora_rank: int = 256  # rank of the compressed key/value latent c_KV: what the cache stores
    qk_nope_head_dim: int = 64  # per-head query/key dims without position
    qk_rope_head_dim: int = 32  # per-head query dims with RoPE; the rope key is shared by all heads
    v_head_dim: int = 64  # per-head value dims
    # DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer picks the keys each MLA query attends to
    index_topk: int = 0  # keys each query attends to (V3.2: 2048; V4's CSA: entries, 512); 0 = dense attention, no indexer
    index_n_heads: int = 8  # indexer heads (V3.2 and V4: 64)
    index_head_dim: int = 64  # indexer query/key dims (V3.2 and V4: 128); RoPE rotates qk_rope_head_dim of them
    index_warmup: int = 0  # first training steps: dense attention, only the indexers learn (train.py)
    index_loss_weight: float = 1.0  # weight of the indexers' KL loss in the training loss
    # DeepSeekMoE
    n_dense_layers: int = 1  # the first layers keep a dense SwiGLU
    n_routed_experts: int = 8  # routed experts per MoE layer; 0 = dense model
    n_shared_experts: int = 1  # always-on shared experts
    n_activated_experts: int = 2  # routed experts per token (top-k)
    moe_inter_dim: int = 0  # width of one expert; 0 = inter_dim / (n_activated + n_shared): dense-equal active width
    n_expert_groups: int = 1  # routed experts are split into this many groups
    n_limited_groups: int = 1  # each token picks its experts from this many groups
    score_func: str = "sigmoid"  # one of SCORE_FUNCS: "sigmoid" (V3), "softmax" (V2) or "sqrtsoftplus" (V4) router scores
    route_scale: float = 1.0  # routed output multiplier (V3 uses 2.5)
    # YaRN: active when block_size > original_seq_len
    original_seq_len: int = 4096  # context the RoPE frequencies were trained for
    rope_factor: float = 40.0  # context extension factor
    beta_fast: int = 32  # YaRN: rotations above this many keep their frequency
    beta_slow: int = 1  # YaRN: rotations below this are interpolated fully
    mscale: float = 1.0  # YaRN attention temperature coefficient
    # ours
    moe_layers: list = field(default_factory=list)  # explicit MoE layer indices; empty = all after n_dense_layers
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing; 0 = off
    seq_aux_alpha: float = 0.0001  # weight alpha of the sequence-wise balance loss; 0 = off
    capacity_factor: float = 0.0  # expert capacity as a multiple of the even share; 0 = dropless
    mtp_depth: int = 0  # Multi-Token Prediction modules; 0 = off
    mtp_lambda: float = 0.3  # weight of the MTP loss
    grad_checkpoint: bool = False  # recompute each block in the backward pass to save activation memory
    # DeepSeek-V4 (the V4 section below); every default keeps the V3 model above
    hc_mult: int = 1  # residual streams of manifold-constrained hyper-connections (mHC); 1 = one plain residual
    hc_sinkhorn_iters: int = 20  # mHC: Sinkhorn-Knopp steps making the stream mixing doubly stochastic
    hc_eps: float = 1e-6  # mHC: added to the collapse weights and to every Sinkhorn sum
    layer_types: list = field(default_factory=list)  # attn='hybrid': "sliding", "csa" or "hca" per layer; empty = all sliding
    sliding_window: int = 128  # attn='hybrid': the recent tokens each query sees uncompressed, itself included
    o_groups: int = 8  # attn='hybrid': head groups of the grouped low-rank output projection
    o_lora_rank: int = 1024  # attn='hybrid': each group's output rank
    csa_rate: int = 4  # CSA: tokens compressed into one entry (m)
    hca_rate: int = 128  # HCA: tokens compressed into one entry (m')
    compress_rope_theta: float = 160000.0  # RoPE base of CSA and HCA layers (with YaRN where block_size > original_seq_len)
    n_hash_layers: int = 0  # the first MoE layers pick experts by a frozen token -> experts table (V4: 3)
    swiglu_limit: float = 0.0  # clamp experts' gate projection above and up projection both ways (V4: 10); 0 = off

    # the values each key takes alone (configurator's rules, which train.py's RULES include); joint_rules checks
    # the values that depend on other keys
    RULES: ClassVar[dict] = dict(
        vocab_size=at_least(1), block_size=at_least(1), n_layer=at_least(1), n_embd=at_least(1), n_head=at_least(1),
        n_kv_head=at_least(0), dropout=between(0, 1, open_high=True), attn=one_of(*ATTENTION_KINDS),
        norm_eps=above(0), rope_theta=above(0), inter_dim=at_least(0), q_lora_rank=at_least(0),
        kv_lora_rank=at_least(0), qk_nope_head_dim=at_least(0),
        qk_rope_head_dim=(lambda v: v >= 2 and v % 2 == 0, "even and at least 2"), v_head_dim=at_least(1),
        n_dense_layers=at_least(0), n_routed_experts=at_least(0), n_shared_experts=at_least(0),
        n_activated_experts=at_least(1), moe_inter_dim=at_least(0), n_expert_groups=at_least(1),
        n_limited_groups=at_least(1), score_func=one_of(*SCORE_FUNCS), route_scale=above(0),
        original_seq_len=at_least(1), rope_factor=at_least(1), beta_fast=at_least(1), beta_slow=at_least(1),
        mscale=at_least(0), bias_update_speed=at_least(0), seq_aux_alpha=at_least(0), capacity_factor=at_least(0),
        mtp_depth=at_least(0), mtp_lambda=at_least(0), index_topk=at_least(0), index_n_heads=at_least(1),
        index_head_dim=at_least(2), index_warmup=at_least(0), index_loss_weight=at_least(0),
        hc_mult=at_least(1), hc_sinkhorn_iters=at_least(1), hc_eps=above(0), sliding_window=at_least(1),
        o_groups=at_least(1), o_lora_rank=at_least(1), csa_rate=at_least(1), hca_rate=at_least(1),
        compress_rope_theta=above(0), n_hash_layers=at_least(0), swiglu_limit=at_least(0),
        layer_types=(lambda v: isinstance(v, (list, tuple)) and all(t in LAYER_TYPES for t in v),
                     f"a list of {', '.join(map(repr, LAYER_TYPES))}, one per layer"))

    def __post_init__(self):
        line = first_refusal(vars(self), self.RULES) or next(
            (refusal(key, getattr(self, key), allowed) for key, ok, allowed in self.joint_rules() if not ok), None)
        if line:
            raise ConfigError(line)
        self.n_kv_head = self.n_kv_head or self.n_head
        self.inter_dim = self.inter_dim or 64 * math.ceil(8 * self.n_embd / 3 / 64)
        self.moe_inter_dim = self.moe_inter_dim or self.inter_dim // (self.n_activated_experts + self.n_shared_experts)
        if self.attn == "hybrid":
            self.layer_types = list(self.layer_types) or ["sliding"] * self.n_layer

    def joint_rules(self):
        """(key, whether its value fits the other keys', what it may be) of each rule involving several keys, on
        the values as given (0 still meaning a default)."""
        reach = self.n_routed_experts // self.n_expert_groups * self.n_limited_groups
        layers = self.n_layer + self.mtp_depth  # the MTP modules are layers n_layer.. of moe_layers
        return (
            ("kv_lora_rank", self.attn != "mla" or self.kv_lora_rank >= 1, "at least 1 with attn='mla'"),
            ("n_kv_head", self.n_head % (self.n_kv_head or self.n_head) == 0, f"a divisor of n_head={self.n_head}, or 0"),
            ("n_embd", self.attn != "gqa" or self.n_embd % (2 * self.n_head) == 0,
             f"a multiple of 2 * n_head = {2 * self.n_head} with attn='gqa' (even head dims, for RoPE)"),
            ("n_expert_groups", self.n_routed_experts % self.n_expert_groups == 0,
             f"a divisor of n_routed_experts={self.n_routed_experts}"),
            ("n_limited_groups", self.n_limited_groups <= self.n_expert_groups,
             f"at most n_expert_groups={self.n_expert_groups}"),
            ("n_activated_experts", not self.n_routed_experts or self.n_activated_experts <= reach,
             f"at most the {reach} routed experts a token can reach (n_routed_experts={self.n_routed_experts} / "
             f"n_expert_groups={self.n_expert_groups} x n_limited_groups={self.n_limited_groups})"),
            ("moe_layers", isinstance(self.moe_layers, (list, tuple)) and all(
                isinstance(i, int) and 0 <= i < layers for i in self.moe_layers),
             f"a list of layer indices in [0, n_layer + mtp_depth = {layers})"),
            # DeepSeek Sparse Attention as DeepSeek-V3.2 has it: the indexer picks keys for MLA, from its query latent;
            # V4's CSA layers use the same keys for theirs, which picks compressed entries
            ("index_topk", not self.index_topk or self.attn in ("mla", "hybrid"),
             "0 with attn='gqa': DeepSeek Sparse Attention picks the keys of MLA"),
            ("q_lora_rank", not self.index_topk or self.q_lora_rank >= 1,
             f"at least 1 with index_topk={self.index_topk}: the indexer's queries come from MLA's query latent"),
            ("index_head_dim", not self.index_topk or self.index_head_dim >= self.qk_rope_head_dim,
             f"at least qk_rope_head_dim={self.qk_rope_head_dim}: RoPE turns that many of the indexer's dims"),
            ("index_warmup", self.index_topk or not self.index_warmup,
             "0 with index_topk=0: a dense model has no indexers to warm up"),
            *self.v4_rules())

    def v4_rules(self):
        """joint_rules of the V4 keys."""
        hybrid, n_moe = self.attn == "hybrid", sum(map(self.is_moe, range(self.n_layer)))
        return (
            ("layer_types", len(self.layer_types) in ((0, self.n_layer) if hybrid else (0,)),
             f"one entry per layer (n_layer={self.n_layer}) with attn='hybrid' (empty: all 'sliding'), else empty"),
            ("o_groups", not hybrid or self.n_head % self.o_groups == 0, f"a divisor of n_head={self.n_head}"),
            ("q_lora_rank", not hybrid or self.q_lora_rank >= 1, "at least 1 with attn='hybrid' (queries from a latent)"),
            ("index_topk", not hybrid or "csa" not in self.layer_types or self.index_topk >= 1,
             "at least 1 with 'csa' layers: the compressed entries each query attends to"),
            ("index_warmup", not hybrid or not self.index_warmup or "csa" in self.layer_types,
             "0 with attn='hybrid' and no 'csa' layer: only CSA has an indexer to warm up"),
            ("n_hash_layers", self.n_hash_layers <= n_moe, f"at most the {n_moe} MoE layers (the first are hashed)"))

    def layer_type(self, layer_id):
        """attn='hybrid': the kind of layer layer_id; the MTP modules' (layers n_layer..) are 'sliding', as the MTP
        layer of both released V4 models is (its compress ratio 0 in their config.json)."""
        return self.layer_types[layer_id] if layer_id < self.n_layer else "sliding"

    def is_hash(self, layer_id):
        """Whether layer layer_id routes by the token table: the first n_hash_layers MoE layers."""
        return self.is_moe(layer_id) and sum(map(self.is_moe, range(layer_id))) < self.n_hash_layers

    def is_moe(self, layer_id):
        if not self.n_routed_experts:
            return False
        return layer_id in self.moe_layers if self.moe_layers else layer_id >= self.n_dense_layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, [..., dim] -> [..., dim]."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), self.weight, self.eps).type_as(x)


def rope_frequencies(dim, seqlen, cfg, theta=None, yarn=True):
    """The rotation frequencies of the dim/2 pairs at base theta (default cfg.rope_theta), [dim/2] float32, with
    YaRN's frequency interpolation (V3 reference, precompute_freqs_cis) when yarn and the context seqlen exceeds
    original_seq_len."""
    theta = theta or cfg.rope_theta
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn and seqlen > cfg.original_seq_len:
        # dims that turn fewer than beta_slow times over the original context are interpolated fully,
        # those that turn more than beta_fast times keep their frequency, a linear ramp in between
        def correction_dim(rotations):
            return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def rope_angles(positions, freqs):
    """cos and sin of the angles position * frequency, [..., dim/2] float32 each for positions [...]. The
    product and its cos and sin are taken in float64, so that positions far past block_size (a decode that
    slides) keep their angles accurate; MPS has no float64, so there they are computed on the CPU."""
    device = positions.device
    work = "cpu" if device.type == "mps" else device
    angles = positions.to(work, torch.float64)[..., None] * freqs.to(work, torch.float64)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def precompute_rope(dim, seqlen, cfg):
    """cos and sin of the rotation angles of positions 0..seqlen-1, [seqlen, dim/2] each."""
    return rope_angles(torch.arange(seqlen), rope_frequencies(dim, seqlen, cfg))


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim, DeepSeek's layout. x: [B, T, H, d]; cos, sin:
    [T, d/2], or [B, T, d/2] when each row sits at its own positions."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).type_as(x)


def visible(start_pos, T, L, slots, window, device):
    """Which of L keys each of T queries sees: a query at position q sees the keys at positions q - window < p <= q.
    The keys are the first L slots of a rolling cache of `slots` slots that holds position p in slot p % slots
    and whose latest write is the last query's position (start_pos + T - 1), so slot s holds the latest
    position p <= that one with p % slots == s (negative: never written). start_pos: an int -> [T, L]; per-row
    positions [B] -> [B, 1, T, L]; None (a full forward, keys = queries at 0..T-1) -> [T, T], or None when the
    band is the whole causal triangle (T <= window), for SDPA's causal kernel."""
    if start_pos is None:
        if T <= window:
            return None
        start_pos, slots = 0, T
    first = start_pos if isinstance(start_pos, int) else start_pos.view(-1, 1, 1, 1)
    query = first + torch.arange(T, device=device)[:, None]  # [T, 1] positions of the queries
    last = first + T - 1
    if isinstance(last, int) and last < slots:  # nothing has wrapped: slot s holds position s (decoding's usual case)
        key = torch.arange(L, device=device)
        return (key <= query) & (key > query - window)
    key = last - (last - torch.arange(L, device=device)) % slots  # [L] positions in the slots
    return (key <= query) & (key > query - window) & (key >= 0)


def write_cache(cache, new, start_pos, rows):
    """Store new [B, T, ...] at positions start_pos.. of a rolling cache [max_batch, slots, ...] (position p goes
    to slot p % slots, over the oldest) and return the slots the B rows attend to (read_cache)."""
    store_cache(cache, new, start_pos, rows)
    return read_cache(cache, new.size(0), start_pos, new.size(1), rows)


def store_cache(cache, new, start_pos, rows):
    """write_cache without reading back: for an int start_pos into rows 0..B-1, for per-row positions start_pos [B]
    into the cache rows `rows` [B] (None: 0..B-1)."""
    B, T = new.shape[:2]
    slots = cache.size(1)
    if isinstance(start_pos, int) and start_pos + T <= slots:
        cache[:B, start_pos:start_pos + T] = new
    elif isinstance(start_pos, int):
        cache[:B, (start_pos + torch.arange(T, device=new.device)) % slots] = new
    else:
        rows = torch.arange(B, device=new.device) if rows is None else rows
        cache[rows[:, None], (start_pos[:, None] + torch.arange(T, device=new.device)) % slots] = new


def read_cache(cache, B, start_pos, T, rows):
    """The slots the B rows attend to once T positions from start_pos are stored (visible() says which hold
    what): the first start_pos + T of rows 0..B-1 for an int start_pos while nothing has wrapped, else all of
    them (a view); for per-row positions, all slots of the cache rows `rows` [B] (a copy; rows None: 0..B-1,
    a view, which the engine's full batches read without copying every layer's cache every step)."""
    if isinstance(start_pos, int):
        return cache[:B, :start_pos + T]
    return cache[:B] if rows is None else cache[rows]


def recent(cache, B, start_pos, rows, n):
    """The n positions before start_pos (an int, or [B] per row) in cache rows `rows` [B] (None: 0..B-1) of a
    rolling cache [max_batch, slots, ...] holding position p in slot p % slots -> (what they hold [B, n, ...],
    their positions [n] or [B, n]). A position below 0 is none: its slot holds zeros or an earlier sequence's."""
    first = start_pos if isinstance(start_pos, int) else start_pos[:, None]
    pos = first - n + torch.arange(n, device=cache.device)
    slots = pos % cache.size(1)
    if rows is None and not isinstance(start_pos, int):  # per-row positions pick per-row slots
        rows = torch.arange(B, device=cache.device)
    return (cache[:B, slots] if rows is None else cache[rows[:, None], slots]), pos


def remember(cache, new, start_pos, rows):
    """write_cache of new [B, T, ...]'s last positions, as many as the cache has slots."""
    over = new.size(1) - cache.size(1)
    if over > 0:
        new, start_pos = new[:, over:], start_pos + over
    write_cache(cache, new, start_pos, rows)


def banded(keys, queries, window):
    """Which keys each query sees: those at positions q - window < p <= q, p >= 0. keys [L] and queries [T] ->
    [T, L]; per row, [B, L] and [B, T] -> [B, T, L]."""
    keys, queries = keys[..., None, :], queries[..., :, None]
    return (keys <= queries) & (keys > queries - window) & (keys >= 0)


def attend(q, k, v, scale, mask, dropout):
    """Softmax attention over [B, H, T, d] tensors; mask from visible(), None for plain causal attention."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=True)


def apply_rope_halves(x, cos, sin):
    """RoPE on the first 2 * cos.size(-1) dims of the last dim, rotating halves (x[i], x[i + r/2]) rather than
    MLA's adjacent pairs: the layout of DeepSeek-V3.2's indexer as transformers' DeepseekV32 holds it. The other
    dims pass unrotated. x: [B, T, H, d]; cos, sin: [T, r/2], or [B, T, r/2] per row."""
    r = cos.size(-1)
    x1, x2, rest = x.float().split([r, r, x.size(-1) - 2 * r], -1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1).type_as(x)


class Indexer(nn.Module):
    """The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2 report, sec. 2.1): a few small ReLU
    heads score each query t against every token s,
        I(t, s) = sum_h w(t, h) * ReLU(q(t, h) . k(s) / sqrt(index_head_dim)),   w(t, h) = (x_t W_w)_h / sqrt(n_heads),
    and MLA attends only to the index_topk tokens of highest score in t's causal prefix (select). The query heads
    q(t, h) come from MLA's query latent c_Q (wq_b), the one key per token k(s) from the hidden state (wk, then
    LayerNorm, as in the reference), the head weights w from the hidden state; RoPE turns the first
    qk_rope_head_dim dims of q and k by halves (apply_rope_halves). The reference also rotates q and k by a
    Hadamard matrix and scores in FP8: an orthogonal rotation keeps every dot product, and FP8 only rounds
    them, so neither changes which tokens score highest; both are left out.
    forward: x [B, T, D], c_Q [B, T, q_lora_rank] -> the queries q [B, T, n_heads, index_head_dim], the key
    k [B, T, index_head_dim] (what the cache holds) and the head weights w [B, T, n_heads]; lightning_scores
    scores the queries against keys: I [B, T, S] float32."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.n_embd, self.n_heads, bias=False)

    def forward(self, x, c_q, cos, sin):
        B, T, _ = x.shape
        q = self.wq_b(c_q).view(B, T, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))[:, :, None]
        qk = apply_rope_halves(torch.cat([q.float(), k.float()], 2), cos, sin)  # one RoPE for the queries and the key
        return qk[:, :, :-1], qk[:, :, -1], self.weights_proj(x)


def qk_dots(q, k):
    """q k^T for queries q [..., M, d] and keys k [..., S, d] -> [..., M, S] in the compute dtype. With fewer
    queries than keys (decoding against a cache) it is computed as (k q^T)^T: CPU BLAS multiplies a few rows by a
    long transposed right operand several times slower, in bf16 ~40x (BENCHMARKS.md)."""
    if q.size(-2) < k.size(-2):
        return (k @ q.mT).mT.contiguous()
    return q @ k.mT


def lightning_scores(q, keys, w):
    """The lightning indexer's scores I(t, s) = sum_h w(t, h) ReLU(q(t, h) . k(s)) / sqrt(H d) (V3.2's DSA and
    V4's CSA): q [B, T, H, d], keys [B, S, d], w [B, T, H] -> [B, T, S] float32, computed in the compute dtype
    (under bf16 autocast they round as the reference's FP8 scores do, more finely)."""
    B, T, H, d = q.shape
    dots = qk_dots(q.flatten(1, 2), keys).view(B, T, H, -1)  # [B, T, H, S]
    # both scales go on w, a [B, T, H] tensor rather than [B, T, H, S]: ReLU(a) * s = ReLU(a * s) for s > 0
    return (w.unsqueeze(-2) * (H * d) ** -0.5 @ F.relu(dots)).squeeze(-2).float()


def select(scores, mask, k):
    """Each query's k keys of highest index score among those mask lets it see: scores [B, T, L], mask [T, L]
    or [B, 1, T, L] -> (indices [B, T, k], which of them the mask allows [B, T, k]). Fewer allowed keys than k:
    all of them, the rest of the picks disallowed."""
    allowed = mask.squeeze(1) if mask.dim() == 4 else mask.expand_as(scores)
    picks = scores.masked_fill(~allowed, float("-inf")).topk(k, -1)[1]
    return picks, allowed.gather(-1, picks)


def gather_rows(cache, rows, picks):
    """The slots picks [B, T, k] of the cache rows `rows` [B] of a cache [max_batch, slots, ...] -> [B, T, k, ...],
    as one index_select over the flattened cache, which copies nothing else (advanced indexing, cache[rows, picks],
    was several times slower on CPU)."""
    at = picks + cache.size(1) * rows.view(-1, 1, 1)
    return cache.flatten(0, 1).index_select(0, at.flatten()).view(*picks.shape, *cache.shape[2:])


def attention_probs(q, k, mask, scale):
    """softmax(q k^T * scale) over the keys mask allows, in float32: q [B, H, T, d], k [B, H, L, d], mask [T, L] or
    [B, 1, T, L] -> [B, H, T, L]."""
    return ((q @ k.transpose(-1, -2)).float() * scale).masked_fill(~mask, float("-inf")).softmax(-1)


def index_kl(scores, probs, mask):
    """The indexer's loss (V3.2 report, sec. 2.1.1): KL(p_t || softmax(I_t)) over the keys mask allows each
    query, averaged over the queries that see any, where p_t is the main attention's probabilities of those keys
    summed over the heads and normalised, a target (no gradient). DSA's keys are all the attention reads; V4's CSA
    passes its compressed entries alone, whose share of the attention (the window and the sink take the rest) is
    so renormalised. scores [B, T, L] float32; probs: attention's [B, H, T, L]; mask [T, L], [B, T, L] or
    [B, 1, T, L]."""
    p = probs.detach().float().sum(1)
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    allowed = (mask.squeeze(1) if mask.dim() == 4 else mask).expand_as(scores)
    # finfo.min rather than -inf: a query that sees no key (CSA's first tokens) gets a finite row and no gradient
    log_q = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).log_softmax(-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum() / allowed.any(-1).sum().clamp(min=1)


class MLA(nn.Module):
    """Multi-head Latent Attention, [B, T, D] -> [B, T, D].

    Keys and values come from a shared latent c_KV = kv_norm(x W_DKV) of kv_lora_rank dims, plus one
    rope key k_R of qk_rope_head_dim dims shared by all heads; queries optionally from their own latent.
    Training uses the plain form (expand c_KV into per-head keys and values, then SDPA). Cached decoding
    uses the absorbed form: the cache holds only c_KV and k_R, the key up-projection is folded into the
    query and the value up-projection into the output, so keys and values are never expanded. A query sees
    the block_size positions up to its own (visible), in both forms.
    With index_topk > 0 (DeepSeek Sparse Attention, V3.2) an Indexer picks the index_topk of those keys each
    query attends to: in training as a mask over the selection (sparse_attend), in decoding by gathering the
    selected latents from the cache, which then also holds each token's indexer key."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout, self.window = cfg.n_head, cfg.dropout, cfg.block_size
        self.kv_lora_rank, self.nope, self.rope, self.vdim = (
            cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        qk_head_dim = self.nope + self.rope
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)
            self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_head * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.n_embd, self.n_head * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.n_embd, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_head * (self.nope + self.vdim), bias=False)
        self.wo = nn.Linear(self.n_head * self.vdim, cfg.n_embd, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5
        if cfg.block_size > cfg.original_seq_len:  # YaRN: sharpen attention to match the stretched positions
            self.softmax_scale *= (0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0) ** 2
        self.cache = None  # (c_KV [B, slots, kv_lora_rank], k_R [B, slots, rope], DSA: indexer keys): write_cache
        self.index_topk = cfg.index_topk
        self.indexer = Indexer(cfg) if cfg.index_topk else None
        self.dense = False  # DSA's dense warm-up (Transformer.warm_up_indexers): attend to every key
        self.index_loss = None  # the indexer's KL loss of the last full forward

    def forward(self, x, cos, sin, start_pos=None, rows=None, mask=None):
        B, T, _ = x.shape
        c_q = self.q_norm(self.wq_a(x)) if hasattr(self, "wq_a") else None
        q = self.wq(x) if c_q is None else self.wq_b(c_q)
        q_nope, q_pe = q.view(B, T, self.n_head, -1).split([self.nope, self.rope], -1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], -1)
        c_kv, k_pe = self.kv_norm(c_kv), apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]
        index = None if self.indexer is None else (x, c_q, cos, sin)
        if start_pos is None:
            k_nope, v = self.wkv_b(c_kv).view(B, T, self.n_head, -1).split([self.nope, self.vdim], -1)
            q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_head, -1)], -1).transpose(1, 2)
            dropout = self.dropout if self.training else 0.0
            y = attend(q, k, v.transpose(1, 2), self.softmax_scale, visible(None, T, T, T, self.window, x.device),
                       dropout) if index is None else self.sparse_attend(q, k, v.transpose(1, 2), index, dropout)
            return self.wo(y.transpose(1, 2).flatten(2))
        return self.wo(self.absorbed(q_nope, q_pe, c_kv, k_pe, start_pos, rows, index, mask).flatten(2))

    def sparse_attend(self, q, k, v, index, dropout):
        """Training's DSA over [B, H, T, d] queries, keys and values -> [B, H, T, v_head_dim]: each query attends
        to its index_topk keys of highest index score (a mask over the selection), or to all it may see when
        they are no more (then exactly attend's dense MLA) or while warming up. The indexer reads its inputs
        detached and learns only from index_kl (left in self.index_loss); the model, through the selection,
        gets no gradient from the indexer (V3.2 report, sec. 2.1.1)."""
        x, c_q, cos, sin = (t.detach() for t in index)
        T = q.size(2)
        scores = lightning_scores(*self.indexer(x, c_q, cos, sin))
        mask = visible(0, T, T, T, self.window, q.device)  # [T, T]: causal, within the block
        if self.dense or T <= self.index_topk:
            y = attend(q, k, v, self.softmax_scale, visible(None, T, T, T, self.window, q.device), dropout)
            with torch.no_grad():
                probs = attention_probs(q, k, mask, self.softmax_scale)
        else:  # written out (SDPA with a mask is no faster on CPU): the probabilities are the indexer's target too
            picks, allowed = select(scores, mask, self.index_topk)
            mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picks, allowed)[:, None]  # [B, 1, T, T]
            probs = attention_probs(q, k, mask, self.softmax_scale)
            y = F.dropout(probs, dropout).type_as(v) @ v
        self.index_loss = index_kl(scores, probs, mask)
        return y

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, start_pos, rows=None, index=None, mask=None):
        """Attention against the latent cache; returns the per-head outputs [B, T, H, v_head_dim]. mask: visible()'s
        for the cache (Transformer.decode_mask), built here when not given. index: DSA's
        (x, c_Q, cos, sin): the new tokens' indexer keys join the cache, each query is scored against every
        cached key, and attention reads only its index_topk picks, gathered from the cache when the T queries'
        picks are no more than the cache holds (decoding), else as a mask over the selection (a long prefill)."""
        new, (B, T), slots = [c_kv, k_pe], q_nope.shape[:2], self.cache[0].size(1)
        if index is not None:
            q_index, k_index, w_index = self.indexer(*index)
            new.append(k_index)
        for cache, t in zip(self.cache, new):
            store_cache(cache, t, start_pos, rows)
        L = min(start_pos + T, slots) if isinstance(start_pos, int) else slots  # the keys read_cache gives
        if mask is None:
            mask = visible(start_pos, T, L, slots, self.window, q_nope.device)
        gathered = None
        if index is not None and self.index_topk < L and not self.dense:  # warming up: dense as in training
            keys = read_cache(self.cache[2], B, start_pos, T, rows)
            picks, allowed = select(lightning_scores(q_index, keys, w_index), mask, self.index_topk)
            if T * self.index_topk <= L:  # [B, T, k, ...]: each query's own keys, from the cache itself
                ids = torch.arange(B, device=picks.device) if rows is None else rows
                gathered, mask = [gather_rows(c, ids, picks) for c in self.cache[:2]], allowed[:, None]
            else:
                mask = torch.zeros(B, T, L, dtype=torch.bool, device=picks.device).scatter_(-1, picks, allowed)[:, None]
        # [B, 1, L, ...]: every query reads every key
        c_kv, k_pe = gathered or (read_cache(c, B, start_pos, T, rows)[:, None] for c in self.cache[:2])
        G, S = c_kv.size(1), c_kv.size(2)  # G groups of queries each reading its S keys: 1 group of T, or T of 1
        w = self.wkv_b.weight.view(self.n_head, self.nope + self.vdim, self.kv_lora_rank)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w[:, :self.nope])  # q W_UK: queries in latent space
        q_lat, q_pe = (t.reshape(B, G, -1, t.size(-1)) for t in (q_lat, q_pe))  # [B, G, T/G H, d]
        scores = (qk_dots(q_lat, c_kv) + qk_dots(q_pe, k_pe)).float().view(B, T, self.n_head, S)
        mask = mask.reshape(-1, T, 1, mask.size(-1))  # [T, L] or [B, 1, T, L] -> [1 or B, T, 1, L]: over the heads
        probs = (scores * self.softmax_scale).masked_fill(~mask, float("-inf")).softmax(-1).type_as(c_kv)
        o_lat = (probs.view(B, G, -1, S) @ c_kv).view(B, T, self.n_head, -1)  # [B, T, H, kv_lora_rank]
        return torch.einsum("bthc,hdc->bthd", o_lat, w[:, self.nope:])  # then W_UV, per head

    def cache_shapes(self, batch, length):
        index = [] if self.indexer is None else [(batch, length, self.indexer.head_dim)]
        return [(batch, length, self.kv_lora_rank), (batch, length, self.rope)] + index


class GQA(nn.Module):
    """Grouped-query attention with RoPE on the whole head (Llama, SmolLM2), [B, T, D] -> [B, T, D].
    n_kv_head key/value heads are shared by n_head / n_kv_head query heads each."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.dropout, self.window = cfg.n_head, cfg.n_kv_head, cfg.dropout, cfg.block_size
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.cache = None  # (k, v), each [B, slots, n_kv_head, head_dim], while generating: write_cache

    def forward(self, x, cos, sin, start_pos=None, rows=None, mask=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_head, -1), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_head, -1), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_head, -1)
        if start_pos is not None:
            k, v = (write_cache(c, new, start_pos, rows) for c, new in zip(self.cache, (k, v)))
        if mask is None:
            mask = visible(start_pos, T, k.size(1), T if start_pos is None else self.cache[0].size(1), self.window,
                           x.device)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = attend(q, k, v, self.head_dim ** -0.5, mask, self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).flatten(2))

    def cache_shapes(self, batch, length):
        return [(batch, length, self.n_kv_head, self.head_dim)] * 2


def swiglu(gate, up, limit=0.0):
    """silu(gate) * up; with a limit (V4's swiglu_limit), gate clamped from above and up both ways first."""
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward w2(swiglu(w1 x, w3 x)), [..., D] -> [..., D]. Also the shared experts."""

    def __init__(self, dim, inter_dim, limit=0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up
        self.limit = limit

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class Gate(nn.Module):
    """The router: scores s = sigmoid(x W^T) (or softmax) in float32; picks K experts per token from the
    n_limited_groups best groups by s + bias; weights are the unbiased scores of the chosen experts,
    renormalised for sigmoid, times route_scale. x: [N, D] -> weights [N, K], indices [N, K], scores [N, E].
    A group's score follows the paper of each scoring: the sum of its two best scores for sigmoid (V3), its
    best score for softmax (V2's group-limited routing).

    The bias steers selection only (auxiliary-loss-free balancing, V3 sec. 2.1.2); train.py moves it
    once per optimizer step through Transformer.update_bias. V3 introduced it with sigmoid scores; a softmax
    router carries it too (it shifts which experts win, whatever the scores), which V2 did not have: for a
    V2 router as published, and one that transformers' DeepseekV2 loads, train with bias_update_speed=0.

    V4 (report sec. 2.1) scores by sqrt(softplus(x W^T)) ("sqrtsoftplus", renormalised like sigmoid), and its
    first MoE layers are hash layers (hashed): a frozen table tid2eid [vocab_size, K] names each token's experts
    (ids [N], the token ids, select them), the learned scores still weight them, and the bias is not used.
    The table is drawn at random (K distinct experts per token, Roller et al. 2021's random hash), a choice
    of ours: V4's report fixes a table, transformers starts it at zeros for a checkpoint to fill."""

    def __init__(self, cfg, hashed=False):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.n_activated_experts, cfg.score_func, cfg.route_scale
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.hashed = hashed
        if hashed:
            table = torch.rand(cfg.vocab_size, cfg.n_routed_experts).argsort(-1)[:, :cfg.n_activated_experts]
            self.register_buffer("tid2eid", table)

    def forward(self, x, ids=None):
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = (logits.softmax(-1) if self.score_func == "softmax" else
                  F.softplus(logits).sqrt() if self.score_func == "sqrtsoftplus" else logits.sigmoid())
        if self.hashed:
            indices = self.tid2eid[ids.flatten()]
            weights = scores.gather(1, indices)
            return weights / weights.sum(-1, keepdim=True) * self.route_scale, indices, scores
        biased = scores.detach() + self.bias  # the choice of experts carries no gradient: no graph for it
        if self.n_groups > 1:
            groups = biased.view(x.size(0), self.n_groups, -1)
            if self.score_func == "softmax":
                group_scores = groups.amax(-1)
            else:
                group_scores = groups.topk(min(2, groups.size(-1)), -1)[0].sum(-1)
            keep = group_scores.topk(self.topk_groups, -1)[1]
            mask = torch.ones_like(groups[..., 0], dtype=torch.bool).scatter_(1, keep, False)
            biased = groups.masked_fill(mask[..., None], float("-inf")).flatten(1)
        indices = biased.topk(self.topk, -1)[1]
        weights = scores.gather(1, indices)
        if self.score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, indices, scores


def compute_dtype(t):
    """The dtype matmuls on t's device run in: the autocast dtype where autocast is on, else t's own."""
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def sharded(module):
    """Whether some of module's parameters are DTensors, as FSDP2 (train_ddp.py --fsdp) leaves them between
    forwards: shards, whole only inside their block's forward."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def grouped_mm_ok(x, *dims):
    """torch._grouped_mm runs on CUDA in bf16 on Hopper and newer, and on CPU from torch 2.13, with
    16-byte-aligned rows. Elsewhere (and under torch.compile on CPU, where it failed here) we loop."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13) and not torch.compiler.is_compiling()


class Experts(nn.Module):
    """E routed SwiGLU experts stored as stacked weights, so that one grouped matmul runs them all.
    x: [M, D] rows sorted by expert, counts: [E] rows per expert -> [M, D]. impl: 'auto' (see choose),
    'grouped_mm', 'padded' or 'loop', for comparing them."""

    def __init__(self, n_experts, dim, inter_dim, limit=0.0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.impl, self.limit = "auto", limit
        self.kept = None  # while decoding: (w1, w2, w3) cast to the compute dtype (keep_cast)

    def keep_cast(self, dtype):
        """Keep the weights cast to dtype (None: let the casts go). Transformer.setup_cache keeps them while the KV
        caches exist, when the weights do not change, so that a decoding step casts no expert: casting all of them
        in every step was the largest part of a batched decoding step's MoE time."""
        ws = (self.w1, self.w2, self.w3)
        self.kept = None if dtype in (None, self.w1.dtype) else tuple(w.detach().to(dtype) for w in ws)

    def weights(self, dtype):
        """(w1, w2, w3) in dtype: the kept casts when decoding (no autograd), else cast now."""
        if self.kept is not None and self.kept[0].dtype == dtype and not torch.is_grad_enabled():
            return self.kept
        return tuple(w.to(dtype) for w in (self.w1, self.w2, self.w3))

    def forward(self, x, counts):
        x = x.to(compute_dtype(x))  # grouped_mm ignores autocast: cast by hand
        w1, w2, w3 = self.weights(x.dtype)
        impl = self.choose(x, counts) if self.impl == "auto" else self.impl
        if impl == "padded":
            return expert_padded(x, counts, w1, w2, w3, self.limit)
        w1, w2, w3 = (w.transpose(1, 2) for w in (w1, w2, w3))
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            h = swiglu(torch._grouped_mm(x, w1, offs=offs), torch._grouped_mm(x, w3, offs=offs), self.limit)
            return torch._grouped_mm(h, w2, offs=offs)
        return expert_loop(x, counts, w1, w2, w3, self.limit)

    def choose(self, x, counts):
        """The padded batched products on CPU in bf16 (or fp16) unless padding would more than double the rows:
        there matmuls go through oneDNN, whose fixed cost per call makes E small products dearer than one
        batched product over all experts, padding included; in float32 the small products are efficient and
        padding is waste. Padding to 16 rows an expert (a decoding step of a few rows) stays padded whatever
        the doubling: products that small cost less than grouped_mm's fixed cost per call. Else grouped_mm
        where it runs, else the loop."""
        small = counts.max() <= 16
        if x.device.type == "cpu" and x.dtype != torch.float32 and (
                small or counts.numel() * counts.max() <= 2 * x.size(0)):
            return "padded"
        return "grouped_mm" if grouped_mm_ok(x, self.w1.size(2), self.w1.size(1)) else "loop"


@torch.compiler.disable  # slice sizes change every step: compiled, each new size would recompile
def expert_loop(x, counts, w1, w2, w3, limit=0.0):
    """One expert at a time on its contiguous slice; w1, w3: [E, D, I], w2: [E, I, D]."""
    # split and unbind rather than x[a:b] and w1[e]: the backward of w1[e] fills a zero gradient
    # for all E experts, once per expert (E^2 work); unbind's backward stacks the E gradients once
    out = [swiglu(xe @ a, xe @ c, limit) @ b
           for xe, a, b, c in zip(x.split(counts.tolist()), w1.unbind(), w2.unbind(), w3.unbind())]
    return torch.cat(out)


@torch.compiler.disable  # the padded length changes every step
def expert_padded(x, counts, w1, w2, w3, limit=0.0):
    """Each expert's rows zero-padded to C, the longest run rounded up to a multiple of 16, then three batched
    products over all experts instead of 3E small ones; w1, w3: [E, I, D], w2: [E, D, I], the parameters'
    layout. The rounding keeps the shapes oneDNN sees few: it compiles kernels for each new one. The weights
    multiply from the left, on [E, D, C] columns, so that their gradients come out in their own layout
    (bmm's gradients are contiguous: with transposed weights each would need a transposing copy)."""
    E, C = counts.numel(), -(-int(counts.max()) // 16) * 16
    expert = torch.repeat_interleave(counts)  # [M]: the expert of each row
    slot = expert * C + torch.arange(x.size(0), device=x.device) - (counts.cumsum(0) - counts)[expert]
    xt = x.new_zeros(E * C, x.size(1)).index_copy(0, slot, x).view(E, C, -1).transpose(1, 2)  # [E, D, C]
    h = swiglu(torch.bmm(w1, xt), torch.bmm(w3, xt), limit)  # [E, I, C]; padding columns stay zero
    return torch.bmm(w2, h).transpose(1, 2).reshape(E * C, -1).index_select(0, slot)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus the weighted sum of K fine-grained routed experts, [B, T, D] -> [B, T, D].

    Dispatch sorts the (token, expert) pairs by expert so each expert runs on one contiguous slice. With
    capacity_factor > 0 an expert keeps at most ceil(factor * N * K / E) of its tokens, those with the
    highest scores (V2's token dropping); a dropped pair contributes nothing. After each forward, `load`
    holds the tokens per expert, `dropped` the dropped pairs, `aux_loss` the sequence-wise balance loss."""

    def __init__(self, cfg, hashed=False):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.capacity_factor = cfg.capacity_factor
        self.seq_aux_alpha = 0.0 if hashed else cfg.seq_aux_alpha  # a hash layer's choice is not learned
        self.gate = Gate(cfg, hashed)
        self.experts = Experts(cfg.n_routed_experts, cfg.n_embd, cfg.moe_inter_dim, cfg.swiglu_limit)
        self.shared_experts = MLP(cfg.n_embd, cfg.n_shared_experts * cfg.moe_inter_dim, cfg.swiglu_limit) \
            if cfg.n_shared_experts else None
        self.dense = None  # while decoding on a CPU: the experts' weights side by side, shared ones too (keep_dense)

    def forward(self, x, ids=None):
        """x [B, T, D]; ids [B, T], the token ids, which a hash layer routes by."""
        B, T, D = x.shape
        x = x.reshape(-1, D)
        weights, indices, scores = self.gate(x, ids)
        flat = indices.flatten()  # [N*K], pair p is token p // K
        counts = torch.bincount(flat, minlength=self.n_experts)
        self.load = counts.float()
        if self.dense is not None and not torch.is_grad_enabled() and x.size(0) <= DENSE_DECODE_TOKENS and \
                2 * flat.numel() >= self.n_experts:
            return self.decode_dense(x, weights, indices).view(B, T, D)
        if not self.training and flat.numel() < self.n_experts:  # decoding: too few pairs to be worth sorting
            return self.decode(x, weights, flat).view(B, T, D)
        order = flat.argsort(stable=True)
        if self.capacity_factor and self.training:  # dropping is a training-time budget; inference keeps all
            order, counts, self.dropped = self.drop_over_capacity(flat, counts, scores.gather(1, indices).flatten(),
                                                                  x.size(0))
        else:
            self.dropped = torch.zeros((), device=x.device)
        token = order // self.topk
        # index_select, not x[token]: its backward is an index_add, cheaper than indexing's index_put
        y = self.experts(x.index_select(0, token), counts).to(x.dtype) * weights.flatten().index_select(
            0, order)[:, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.aux_loss = self.balance_loss(scores.view(B, T, -1), indices.view(B, T, -1)) if (
            self.seq_aux_alpha and self.training) else torch.zeros((), device=x.device)
        return out.view(B, T, D)

    def decode(self, x, weights, flat):
        """forward's sum for a few tokens x [N, D] -> [N, D]: each (token, expert) pair runs with its expert's
        weights gathered, in one batched matmul for all pairs; no sort, no per-expert dispatch."""
        self.dropped = self.aux_loss = torch.zeros((), device=x.device)
        dtype = compute_dtype(x)
        w1, w2, w3 = (w.index_select(0, flat).transpose(1, 2) for w in self.experts.weights(dtype))
        xk = x.to(dtype).repeat_interleave(self.topk, 0)[:, None]  # [N*K, 1, D]
        y = torch.bmm(swiglu(torch.bmm(xk, w1), torch.bmm(xk, w3), self.experts.limit), w2).view(x.size(0), self.topk, -1)
        out = (y.to(x.dtype) * weights[..., None].to(x.dtype)).sum(1)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def keep_dense(self, dtype):
        """Keep the experts' weights side by side in dtype for decode_dense (Transformer.setup_cache, while decoding
        on a CPU; None lets them go): w1 then w3 of every routed expert and then the shared ones as one [D, 2 H]
        and w2 as [H, D], H = E I + the shared experts' width."""
        self.dense = None
        if dtype is None:
            return
        e, shared = self.experts, self.shared_experts
        w1, w3, w2 = [e.w1.flatten(0, 1)], [e.w3.flatten(0, 1)], [e.w2.transpose(1, 2).flatten(0, 1)]
        if shared is not None:
            w1, w3, w2 = w1 + [shared.w1.weight], w3 + [shared.w3.weight], w2 + [shared.w2.weight.t()]
        with torch.no_grad():
            self.dense = torch.cat(w1 + w3).t().contiguous().to(dtype), torch.cat(w2).contiguous().to(dtype)

    def decode_dense(self, x, weights, indices):
        """forward's sum for a decoding step's few tokens x [N, D] whose pairs reach half the experts or more:
        every expert, the shared ones included, on every token in two products over the weights side by side, the
        routed experts a token did not choose weighted 0. A CPU step of a few tokens pays each product's fixed
        cost, not its FLOPs: this beats gathering the pairs' experts or sorting them by expert, and a separate
        shared expert (BENCHMARKS.md, section 7)."""
        self.dropped = self.aux_loss = torch.zeros((), device=x.device)
        w13, w2 = self.dense
        N, E = x.size(0), self.n_experts
        xc = x.to(w13.dtype)
        h = swiglu(*(xc @ w13).view(N, 2, -1).unbind(1), self.experts.limit)  # [N, H]
        routed = h[:, :E * self.experts.w1.size(1)].view(N, E, -1)
        routed *= xc.new_zeros(N, E).scatter_(1, indices, weights.to(w13.dtype))[:, :, None]
        return (h @ w2).to(x.dtype)

    def drop_over_capacity(self, flat, counts, affinity, n_tokens):
        """Pairs sorted by expert, highest affinity first within each expert, cut at the capacity.
        flat: [N*K] expert of each pair, counts: [E] pairs per expert -> (kept pairs, kept per expert, number dropped)"""
        capacity = math.ceil(self.capacity_factor * n_tokens * self.topk / self.n_experts)
        by_score = affinity.argsort(descending=True, stable=True)
        order = by_score[flat[by_score].argsort(stable=True)]
        starts = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=flat.device) - starts[flat[order]]
        keep = rank < capacity
        return order[keep], counts.clamp(max=capacity), (~keep).sum().float()

    def balance_loss(self, scores, indices):
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch, where f_i is E/(K T)
        times the tokens that chose expert i and P_i the mean of the token-normalised scores."""
        _, T, E = scores.shape
        chosen = torch.zeros_like(scores).scatter_(2, indices, 1.0)
        f = chosen.sum(1) * E / (self.topk * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return self.seq_aux_alpha * (f * p).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------- DeepSeek-V4
# Options of the same model (V4 report, 2026): hyper-connections (hc_mult > 1), hybrid attention (attn='hybrid'),
# sqrt-softplus and hash routing (score_func, n_hash_layers), the SwiGLU clamp (swiglu_limit). transformers'
# DeepseekV4ForCausalLM computes the same function (tests/test_v4.py); convert.py maps the weights.


def unweighted_rms_norm(x, eps):
    """x / rms(x) over the last dim, without a weight; the statistic in float32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x, cos, sin):
    """V4's partial RoPE: apply_rope on the trailing 2 * cos.size(-1) dims of each head, x [B, T, H, d]; the
    leading dims pass unrotated. With -sin, the inverse rotation."""
    r = 2 * cos.size(-1)
    return torch.cat([x[..., :-r], apply_rope(x[..., -r:], cos, sin)], -1)


def sinkhorn(m, iters, eps):
    """Sinkhorn-Knopp: alternately scale the columns and the rows of positive m [..., N, N] to sum to one (columns
    first, iters column steps in all), which brings m near the doubly-stochastic matrices."""
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """Manifold-constrained hyper-connection (mHC; V4 report sec. 2.2, after Xie et al. 2026) around one block
    f: the residual is N = hc_mult streams x [B, T, N, D] -> [B, T, N, D].

    From the streams of each token, flattened [N D] and RMS-normalised, one linear map fn [(2+N) N, N D] (times
    a learned scale per part, plus a bias base) gives: pre [N] = sigmoid + hc_eps, the weights that collapse
    the streams into f's input u = sum_n pre_n x_n; post [N] = 2 sigmoid, how f(u) is spread over the streams;
    comb [N, N] = softmax over rows + hc_eps, projected near the doubly-stochastic matrices by sinkhorn(), which
    mixes the streams: x_k <- post_k f(u) + sum_j comb[j, k] x_j. A doubly-stochastic mix neither grows nor
    shrinks the residual with depth. The weights are computed in float32."""

    def __init__(self, cfg):
        super().__init__()
        N = self.n = cfg.hc_mult
        self.iters, self.eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty((2 + N) * N, N * cfg.n_embd))
        self.base = nn.Parameter(torch.zeros((2 + N) * N))
        self.scale = nn.Parameter(torch.ones(3))  # of pre, post and comb

    def forward(self, x, f):
        N = self.n
        with torch.autocast(x.device.type, enabled=False):
            z = unweighted_rms_norm(x.flatten(2).float(), self.norm_eps)
            pre, post, comb = F.linear(z, self.fn.float()).split([N, N, N * N], -1)
            b_pre, b_post, b_comb = self.base.float().split([N, N, N * N])
            pre = torch.sigmoid(pre * self.scale[0] + b_pre) + self.eps
            post = 2 * torch.sigmoid(post * self.scale[1] + b_post)
            comb = (comb * self.scale[2] + b_comb).unflatten(-1, (N, N)).softmax(-1) + self.eps
            comb = sinkhorn(comb, self.iters, self.eps)
        y = f((pre[..., None] * x).sum(2).to(x.dtype))
        return post.to(x.dtype)[..., None] * y[..., None, :] + comb.to(x.dtype).transpose(-1, -2) @ x


class HyperHead(nn.Module):
    """The final collapse of the hc_mult streams before the last norm (V4 report sec. 2.2): x [B, T, N, D] ->
    sum_n pre_n x_n [B, T, D], with pre = sigmoid(scale * (rmsnorm(x flat) fn^T) + base) + hc_eps."""

    def __init__(self, cfg):
        super().__init__()
        N = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty(N, N * cfg.n_embd))
        self.base = nn.Parameter(torch.zeros(N))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            z = unweighted_rms_norm(x.flatten(2).float(), self.norm_eps)
            pre = torch.sigmoid(F.linear(z, self.fn.float()) * self.scale.float() + self.base.float()) + self.eps
        return (pre[..., None] * x).sum(2).to(x.dtype)


class Compressor(nn.Module):
    """Compresses every `rate` tokens into one key-value entry of `dim` dims (V4 report sec. 2.3.1 eq. 9-12 for
    CSA, sec. 2.3.2 eq. 20-23 for HCA), x [B, T, D] -> entries [B, T // rate, dim].

    Each token gives a value x W_kv and a gate x W_gate (+ ape, a learned bias per position in the window);
    entry w is the per-channel softmax of the gates over its tokens weighting their values, RMS-normalised
    (norm), with RoPE on its trailing rope dims at the position of its first token, w * rate. overlap (CSA):
    every projection is two series wide, a then b; entry w pools the b series of window w with the a series of
    window w-1, 2 * rate tokens at stride rate (window 0 has no a half). Tokens after the last full window
    are not read: no query can see their entry yet.
    Decoding (step) keeps the last tokens' values and gates in a rolling cache by position (the pending state:
    the tokens of the window not yet ended and, with overlap, the window before), and pools an entry into a
    rolling cache of entries (entry w in slot w % slots) at the token that ends its window."""

    def __init__(self, cfg, dim, rate, overlap):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.span = 2 * rate if overlap else rate  # tokens an entry pools
        self.lookahead = cfg.mtp_depth  # drafts a decoding step writes after its pending token
        width = 2 * dim if overlap else dim
        self.wkv = nn.Linear(cfg.n_embd, width, bias=False)
        self.wgate = nn.Linear(cfg.n_embd, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(rate, width))
        self.norm = RMSNorm(dim, cfg.norm_eps)
        # the compressed layers' RoPE (HybridAttention's cos[1]), for entries at positions the queries are not
        freqs = rope_frequencies(cfg.qk_rope_head_dim, cfg.block_size, cfg, cfg.compress_rope_theta)
        self.register_buffer("freqs", freqs, persistent=False)

    def tokens(self, x, positions):
        """Each token's value and gate, the gate with ape at the token's place in its window: [B, T, width] each
        for x [B, T, D] at positions [T] or [B, T]."""
        return self.wkv(x), self.wgate(x) + self.ape[positions % self.rate]

    def pool(self, kv, gate, first):
        """Entries from the span tokens each pools (in order; with overlap the a series is read from the first
        rate, the b series from the last rate): kv, gate [..., span, width], the entries' positions first [...]
        -> [..., dim]."""
        if self.overlap:
            m, d = self.rate, self.dim
            kv = torch.cat([kv[..., :m, :d], kv[..., m:, d:]], -2)
            gate = torch.cat([gate[..., :m, :d], gate[..., m:, d:]], -2)
        entries = self.norm((kv * gate.softmax(-2, dtype=torch.float32).to(kv.dtype)).sum(-2))
        cos, sin = rope_angles(first, self.freqs)
        return rope_tail(entries[..., None, :], cos, sin)[..., 0, :]

    def forward(self, x):
        """x at positions 0..T-1 -> every entry whose window has ended, [B, T // rate, dim]."""
        B, T, _ = x.shape
        m, n = self.rate, T // self.rate
        if n == 0:  # no window has ended yet
            return x.new_zeros(B, 0, self.dim)
        kv, gate = self.tokens(x[:, :n * m], torch.arange(n * m, device=x.device))
        if self.overlap:  # windows of 2m tokens at stride m, the first m before position 0: weight 0
            kv, gate = F.pad(kv, (0, 0, m, 0)), F.pad(gate, (0, 0, m, 0), value=float("-inf"))
            kv, gate = (t.unfold(1, 2 * m, m).transpose(-1, -2) for t in (kv, gate))
        else:
            kv, gate = kv.unflatten(1, (n, m)), gate.unflatten(1, (n, m))
        return self.pool(kv, gate, torch.arange(n, device=x.device) * m)

    def step(self, x, start_pos, rows, cache):
        """Decoding: x [B, T, D] at positions start_pos.. (an int, or [B] per row) of cache rows `rows` [B]
        (None: 0..B-1). cache = (values, gates [max_batch, span + lookahead, width] by position, entries
        [max_batch, entry slots, dim]): each entry whose window a token of x ends is pooled from the span tokens
        up to it (the cache's, then x's) and written at slot w % entry slots; the cache keeps x's last tokens.
        -> the rows' entry slots [B, entry slots, dim] (entries_visible says which hold what)."""
        values, gates, entries = cache
        B, T, _ = x.shape
        n = self.span - 1  # the tokens before x that a window ending in x may pool
        first = start_pos if isinstance(start_pos, int) else start_pos[:, None]
        pos = (first + torch.arange(-n, T, device=x.device)).expand(B, -1)  # [B, n + T]
        new = [y.to(values.dtype) for y in self.tokens(x, pos[:, n:])]  # as the cache holds them (bf16 gates)
        b, t = (((pos[:, n:] + 1) % self.rate == 0) & (pos[:, n:] >= 0)).nonzero(as_tuple=True)
        if len(b):  # the windows ending in x, read before x's tokens go over the oldest; below position 0 weigh 0
            kv, gate = (torch.cat([recent(c, B, start_pos, rows, n)[0], y], 1) for c, y in zip((values, gates), new))
            i, row = t[:, None] + torch.arange(self.span, device=x.device), b[:, None]  # [K, span] of the n + T
            gate = gate[row, i].masked_fill(pos[row, i, None] < 0, float("-inf"))
            w = (pos[b, t + n] + 1) // self.rate - 1
            at = b if rows is None else rows[b]
            entries[at, w % entries.size(1)] = self.pool(kv[row, i], gate, w * self.rate).to(entries.dtype)
        for c, y in zip((values, gates), new):
            remember(c, y, start_pos, rows)
        return entries[:B] if rows is None else entries[rows]

    def cache_shapes(self, batch, length):
        """step's cache, for decoding that slides over `length` positions: the last span + lookahead tokens'
        values and gates (a window's span, and the drafts a step may write past its next one), entries over
        length // rate + 1 slots, so that no entry a query still sees is overwritten by a later one."""
        return [(batch, self.span + self.lookahead, self.wkv.out_features)] * 2 + [
            (batch, length // self.rate + 1, self.dim)]


def entries_visible(start_pos, T, slots, rate, band, device):
    """Which compressed entries each of T queries sees: entry w (at position w * rate) once its window has ended,
    (w + 1) * rate <= q + 1, while its position lies within the query's band, w * rate > q - band, as a key
    does (visible). The entries lie in a rolling cache of `slots` slots, entry w in slot w % slots, the latest
    the last one the last query (start_pos + T - 1) ended; start_pos None: a full forward, entries 0..slots-1
    for queries 0..T-1. -> [T, slots] for an int or None, [B, T, slots] for per-row positions [B]."""
    first = 0 if start_pos is None else start_pos if isinstance(start_pos, int) else start_pos.view(-1, 1, 1)
    query = first + torch.arange(T, device=device)[:, None]
    w = torch.arange(slots, device=device)
    if start_pos is not None:
        last = (first + T) // rate - 1
        w = last - (last - w) % slots
    return (w >= 0) & ((w + 1) * rate <= query + 1) & (w * rate > query - band)


class CSAIndexer(nn.Module):
    """CSA's lightning indexer (V4 report sec. 2.3.1 eq. 13-17, after V3.2's DeepSeek Sparse Attention): picks
    the index_topk compressed entries each query attends to. -> (scores [B, T, n] float32, picked [B, T, n] bool).

    Its own overlapping Compressor gives index keys K [B, n, index_head_dim] over the attention's windows;
    queries q = c_Q W_q [B, T, index_n_heads, index_head_dim] come from the attention's query latent c_Q, with
    RoPE like the keys (on their trailing dims, where DSA's Indexer turns the leading ones); lightning_scores,
    DSA's, scores them, with w = x weights_proj; a query ranks only the entries it may see (select, DSA's). The
    choice is discrete: no gradient reaches the indexer through it. V4's report does not say how the indexer
    learns; HybridAttention trains it as V3.2's report trains DSA's, by index_kl. Decoding keeps the index keys in
    the compressor's cache (Compressor.step)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.n_embd, cfg.index_n_heads, bias=False)
        self.compressor = Compressor(cfg, cfg.index_head_dim, cfg.csa_rate, overlap=True)

    def forward(self, x, q_latent, cos, sin, seen, keys):
        """seen [T, n] or [B, T, n]: the entries each query may see at all; keys [B, n, index_head_dim]."""
        q = rope_tail(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.dim)), cos, sin)
        scores = lightning_scores(q, keys, self.weights_proj(x))
        picks, allowed = select(scores, seen, min(self.topk, keys.size(1)))
        return scores, torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picks, allowed)


class HybridAttention(nn.Module):
    """DeepSeek-V4's attention (V4 report sec. 2.3), [B, T, D] -> [B, T, D]. Its kind (layer_types) decides what
    a query sees: 'sliding' the last sliding_window tokens; 'csa' also the index_topk entries the Indexer picks
    among the Compressor's entries of every csa_rate tokens (Compressed Sparse Attention); 'hca' also every
    entry of hca_rate tokens (Heavily Compressed Attention). An entry is seen once its window has ended.

    - Queries from a latent as in MLA: c_Q = q_norm(x W_qa), q = c_Q W_qb [H, d], each head RMS-normalised
      without a weight.
    - One key-value head for all query heads: kv = kv_norm(x W_kv) [d] is both key and value; compressed
      entries join it as further keys-values. d = qk_nope_head_dim + qk_rope_head_dim.
    - Partial RoPE on the trailing qk_rope_head_dim dims of q and kv (interleaved pairs); as the values carry
      the rotation too, the output's rope dims are rotated back by the query's position.
    - A learned logit per head (attn_sink) joins every softmax as a key without value: a head may attend to
      nothing.
    - Grouped low-rank output: o_groups groups of contiguous heads, each projected to o_lora_rank by its own
      block of wo_a [o_groups * o_lora_rank, H d / o_groups], then wo_b mixes them to D.
    Sliding layers rotate at base rope_theta without YaRN; CSA and HCA layers at compress_rope_theta, with YaRN
    where block_size > original_seq_len, for queries, keys and entries alike (cos, sin [2, T, rope/2] hold both).
    Past block_size the band of the other attentions holds: a query sees the keys of the last
    min(sliding_window, block_size) tokens and the entries whose position lies in its last block_size.
    Decoding (start_pos, rows as in MLA) keeps rolling caches by position: the window's last keys, and each
    compressor's (Compressor.step) last tokens' values and gates and its entries (CSA's indexer: the index
    keys). As they keep only the last positions, a row's padding (or rejected drafts) may reach at most
    mtp_depth + 1 positions past where its next forward starts (generate.Decoder.batches sees to it).

    CSA's indexer learns as DSA's (V3.2 report sec. 2.1.1; V4's report is silent): it reads its inputs detached
    and leaves in index_loss, in a full forward, the index_kl of its scores to the attention its picks got (while
    warming up, dense: every ready entry is seen, and the KL is to the attention over all of them)."""

    def __init__(self, cfg, layer_id):
        super().__init__()
        self.kind = cfg.layer_type(layer_id)
        self.n_head, self.groups, self.eps = cfg.n_head, cfg.o_groups, cfg.norm_eps
        self.window, self.band = min(cfg.sliding_window, cfg.block_size), cfg.block_size
        self.lookahead = cfg.mtp_depth  # drafts a decoding step writes after its pending token
        self.head_dim = d = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.dropout, self.softmax_scale = cfg.dropout, d ** -0.5
        self.wq_a = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_head * d, bias=False)
        self.wkv = nn.Linear(cfg.n_embd, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.norm_eps)
        self.wo_a = nn.Linear(cfg.n_head * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.n_embd, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_head))
        self.rate = {"sliding": 0, "csa": cfg.csa_rate, "hca": cfg.hca_rate}[self.kind]
        self.compressor = Compressor(cfg, d, self.rate, overlap=self.kind == "csa") if self.rate else None
        self.indexer = CSAIndexer(cfg) if self.kind == "csa" else None
        self.cache = None  # the window's keys [B, window + lookahead, d], then each compressor's: setup_cache
        self.dense = False  # CSA's dense warm-up (Transformer.warm_up_indexers): every ready entry is seen
        self.index_loss = None  # CSA: the indexer's KL loss of the last full forward

    def forward(self, x, cos, sin, start_pos=None, rows=None, mask=None):
        B, T, _ = x.shape
        cos, sin = cos[int(self.rate > 0)], sin[int(self.rate > 0)]  # main or compress RoPE
        q_latent = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(q_latent).unflatten(-1, (self.n_head, self.head_dim)), self.eps)
        q = rope_tail(q, cos, sin)
        kv = rope_tail(self.kv_norm(self.wkv(x))[:, :, None], cos, sin)[:, :, 0]  # [B, T, d]
        first = 0 if start_pos is None else start_pos if isinstance(start_pos, int) else start_pos[:, None]
        queries = first + torch.arange(T, device=x.device)  # positions [T] or [B, T]
        keys = queries
        if start_pos is not None:  # the window - 1 positions before x from the cache, which keeps x's last
            old, before = recent(self.cache[0], B, start_pos, rows, self.window - 1)
            remember(self.cache[0], kv, start_pos, rows)
            kv, keys = torch.cat([old, kv], 1), torch.cat([before, queries], -1)
        seen = banded(keys, queries, self.window).view(-1, T, kv.size(1)).expand(B, -1, -1)
        if self.compressor is not None:
            entries = self.compressed(self.compressor, x, start_pos, rows, 1)
            ready = entries_visible(start_pos, T, entries.size(1), self.rate, self.band, x.device)
            if self.indexer:  # on detached inputs: it learns from index_kl alone
                index_keys = self.compressed(self.indexer.compressor, x.detach(), start_pos, rows, 4)
                index, picked = self.indexer(x.detach(), q_latent.detach(), cos, sin, ready, index_keys)
                ready = ready if self.dense else picked
            kv, seen = torch.cat([kv, entries], 1), torch.cat([seen, ready.expand(B, -1, -1)], -1)
        scores = torch.einsum("bthd,bsd->bhts", q, kv).float() * self.softmax_scale
        scores = scores.masked_fill(~seen[:, None], float("-inf"))
        sink = self.attn_sink.float().view(1, -1, 1, 1).expand(B, -1, T, 1)
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        if self.indexer is not None and start_pos is None:  # the attention its entries (the last keys) got: the
            self.index_loss = index_kl(index, probs[..., kv.size(1) - entries.size(1):], ready)  # indexer's target
        probs = F.dropout(probs, self.dropout if self.training else 0.0)
        o = rope_tail(torch.einsum("bhts,bsd->bthd", probs.type_as(kv), kv), cos, -sin)
        o = torch.einsum("btgi,gri->btgr", o.reshape(B, T, self.groups, -1),
                         self.wo_a.weight.view(self.groups, -1, self.wo_a.in_features))
        return self.wo_b(o.flatten(2))

    def compressed(self, compressor, x, start_pos, rows, at):
        """compressor's entries: all of them in a full forward, else its cache's (self.cache[at:at + 3])."""
        if start_pos is None:
            return compressor(x)
        return compressor.step(x, start_pos, rows, self.cache[at:at + 3])

    def cache_shapes(self, batch, length):
        """The window's last keys [batch, window + lookahead, d] (window - 1 before a step's first query, and
        the positions a step writes), then each compressor's (Compressor.cache_shapes)."""
        compressors = [self.compressor] + ([self.indexer.compressor] if self.indexer else [])
        return [(batch, self.window + self.lookahead, self.head_dim)] + [
            s for c in compressors if c for s in c.cache_shapes(batch, length)]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)). [B, T, D] -> [B, T, D]. With
    hc_mult > 1 each residual is a HyperConnection over [B, T, hc_mult, D] instead."""

    def __init__(self, layer_id, cfg):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps), RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = (MLA(cfg) if cfg.attn == "mla" else GQA(cfg) if cfg.attn == "gqa" else
                     HybridAttention(cfg, layer_id))
        self.ffn = MoE(cfg, cfg.is_hash(layer_id)) if cfg.is_moe(layer_id) else \
            MLP(cfg.n_embd, cfg.inter_dim, cfg.swiglu_limit)
        self.drop = nn.Dropout(cfg.dropout)
        self.hc_attn, self.hc_ffn = (HyperConnection(cfg), HyperConnection(cfg)) if cfg.hc_mult > 1 else (None, None)

    def forward(self, x, cos, sin, start_pos=None, rows=None, ids=None, mask=None):
        """ids [B, T]: the token ids, which hash-routed MoE layers read; mask: Transformer.decode_mask's."""
        x = self.residual(x, self.hc_attn, lambda h: self.attn(self.attn_norm(h), cos, sin, start_pos, rows, mask))
        if isinstance(self.ffn, MoE):
            return self.residual(x, self.hc_ffn, lambda h: self.ffn(self.ffn_norm(h), ids))
        return self.residual(x, self.hc_ffn, lambda h: self.ffn(self.ffn_norm(h)))

    def residual(self, x, hc, f):
        return x + self.drop(f(x)) if hc is None else hc(x, lambda h: self.drop(f(h)))


class MTP(nn.Module):
    """One Multi-Token Prediction module (V3 sec. 2.2): for depth k, position i combines the previous
    depth's hidden state h_i and the embedding of token t_(i+k), and predicts t_(i+k+1) through the shared
    head. h [B, T', D], emb [B, T', D] -> (h for the next depth [B, T', D], its norm [B, T', D] for the head).
    The concatenation puts the embedding first, as in V3's released weights (eh_proj); the block is a full
    block with MoE, as in V3. With start_pos its attention reads and extends its own KV cache, as the trunk's
    layers do (each row at its own position with start_pos [B] and rows [B], as in Transformer.forward):
    speculative decoding drafts with it (generate.Decoder.draft).

    With hc_mult > 1 (V4, whose one module is its reference's MTPBlock) h is the previous depth's N residual
    streams [B, T', N, D] (the trunk's before its HyperHead), and so is the h it returns: each stream is
    projected with the embedding added to it (eh_proj on [emb, h_n] is V4's e_proj emb + h_proj h_n), the block
    is a V4 block over the streams (a 'sliding' layer with attn='hybrid': ModelConfig.layer_type), and the
    module's own HyperHead collapses its output streams before its norm and the shared head."""

    def __init__(self, layer_id, cfg):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(cfg.n_embd, cfg.norm_eps), RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block = Block(layer_id, cfg)
        self.hc_head = HyperHead(cfg) if cfg.hc_mult > 1 else None
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)

    def forward(self, h, emb, cos, sin, start_pos=None, rows=None):
        if self.hc_head is not None:
            emb = emb[:, :, None].expand_as(h)  # the same token embedding joins every stream
        h = self.block(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], -1)), cos, sin, start_pos, rows)
        return h, self.norm(h if self.hc_head is None else self.hc_head(h))


class Output(NamedTuple):
    """What Transformer.forward returns."""
    logits: torch.Tensor | None  # [B, T, vocab_size]; None in training with targets (the loss reads the states)
    loss: torch.Tensor | None  # with targets: ce + mtp_lambda * mtp + aux, which training minimises
    parts: dict  # with targets: its terms by name, detached ('ce', 'mtp', 'aux'; at eval 'mtp_acc', 'mtp_agree')
    hidden: torch.Tensor  # the trunk's states before the final norm [B, T, D] (hc_mult > 1: before the HyperHead, the
    # streams [B, T, hc_mult, D]), what MTP drafts from


class VocabCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets, ignoring targets of -1, and its gradients,
    computed a chunk of rows at a time: x [N, D], weight [V, D], targets [N] -> a float32 scalar. The [N, V]
    logits never exist whole; each chunk's log-softmax is float32, as F.cross_entropy on logits.float()
    computes it, and matmuls run in the autocast dtype, as the plain head's do. The loss is a scalar, so the
    gradients are computed in the same pass and backward only scales them: the logits are computed once."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows, grads):
        dtype = compute_dtype(x)
        w, keep = weight.to(dtype), targets != -1
        share = keep[:, None] / keep.sum()  # a row's share of the mean, 0 if ignored (nan if all are, as in F)
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty_like(x) if grads and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads and ctx.needs_input_grad[1] else None
        for start in range(0, x.size(0), rows):
            xc, tc, sc = x[start:start + rows].to(dtype), targets[start:start + rows, None].clamp(min=0), \
                share[start:start + rows]
            logits = xc @ w.T
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)
            target_logp = logp.gather(1, tc)
            loss -= (target_logp * sc).sum()
            if grad_x is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - one-hot of the target) * the row's share; the share scales the
            # matmuls' [rows, D] sides instead of the [rows, V] one, and the target's entry is computed in float32
            g = torch.exp(logp, out=logits).scatter_(1, tc, (target_logp.exp() - 1).to(dtype))
            if grad_x is not None:
                grad_x[start:start + rows] = (g @ w) * sc
            if grad_w is not None:
                grad_w += g.T @ (xc * sc).to(dtype)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors  # used once: scaled in place (a second backward fails loudly)
        return (None if grad_x is None else grad_x.mul_(grad_loss),
                None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.weight_dtype), None, None, None)


@torch.compiler.disable  # compiled, the loss came out without its grad_fn (torch 2.11 and 2.13): a graph break
def vocab_cross_entropy(x, weight, targets):
    """F.cross_entropy(x @ weight^T, targets, ignore_index=-1) in float32 for x [..., D], targets [...], in
    chunks of rows whose float32 logits stay small (VocabCrossEntropy): a vocabulary-wide head's full logits
    are hundreds of MB, which the allocator maps and unmaps afresh every step."""
    rows = max(1, CE_CHUNK_BYTES["cpu" if x.device.type == "cpu" else "other"] // (4 * weight.size(0)))
    return VocabCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), rows,
                                   torch.is_grad_enabled())


class Transformer(nn.Module):
    """Token ids [B, T] -> Output: logits [B, T, vocab_size], and the loss and its parts when targets are given.

    Attention is banded: a token sees itself and the block_size - 1 tokens before it, at any length. Training
    sequences are at most block_size long, where that is plain causal attention; decoding past block_size keeps
    the band with rolling KV caches addressed by absolute position (write_cache), positions counting on and
    their RoPE angles computed from the position. That is exactly a forward over the whole sequence, not the
    re-encoding of the last block_size tokens from position 0: with several layers, a kept token's keys in
    the deeper layers were computed when older tokens were still in its own window, and they stay so."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTP(cfg.n_layer + k, cfg) for k in range(cfg.mtp_depth))
        self.hc_head = HyperHead(cfg) if cfg.hc_mult > 1 else None
        self.head_t = None  # while decoding on a CPU in float32: the head's weight transposed (setup_cache)
        self.draft_ids = None  # [K] the tokens drafts are chosen among (draft_head); None: all of them
        self.draft_t = None  # while decoding: their rows of the head's weight, transposed (setup_cache)
        rope_dim = cfg.n_embd // cfg.n_head if cfg.attn == "gqa" else cfg.qk_rope_head_dim
        freqs = rope_frequencies(rope_dim, cfg.block_size, cfg)
        if cfg.attn == "hybrid":  # [2, rope/2]: the sliding layers' RoPE (never YaRN), then CSA's and HCA's
            freqs = torch.stack([rope_frequencies(rope_dim, cfg.block_size, cfg, yarn=False),
                                 rope_frequencies(rope_dim, cfg.block_size, cfg, cfg.compress_rope_theta)])
        self.register_buffer("freqs", freqs, persistent=False)
        cos, sin = self.angles(torch.arange(cfg.block_size))  # the table of training's positions
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.moes = [m for m in self.modules() if isinstance(m, MoE)]
        # the attention layers with an indexer to train: DSA's (MLA with index_topk) and V4's CSA layers
        self.indexed = [m for m in self.modules() if isinstance(m, (MLA, HybridAttention)) and m.indexer is not None]
        self.warming_up = False  # DSA's dense warm-up: see warm_up_indexers
        # one id per MoE module, in the order of self.moes: the trunk's layers, then MTP depth k as n_layer + k
        self.moe_layer_ids = [i for i in range(cfg.n_layer + cfg.mtp_depth) if cfg.is_moe(i)]
        self.register_buffer("moe_load", torch.zeros(len(self.moes), cfg.n_routed_experts), persistent=False)
        self.register_buffer("moe_dropped", torch.zeros(len(self.moes)), persistent=False)
        self.apply(self._init_weights)
        # residual output projections start smaller so the residual stream does not grow with depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "wo_b.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding, Gate)):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, (HyperConnection, HyperHead)):  # as transformers: fn ~ N(0, 0.02), base 0, scale 1
            nn.init.normal_(m.fn, std=0.02)
        elif isinstance(m, Experts):
            for w in (m.w1, m.w2, m.w3):
                nn.init.normal_(w, std=0.02)

    def forward(self, idx, targets=None, start_pos=None, rows=None):
        """Training and evaluation: start_pos None, idx at positions 0..T-1 (T past block_size: the banded
        attention of decoding, what tests compare it with). Generation: start_pos is the position of idx[:, 0],
        and attention reads and extends the KV caches set up by setup_cache. For continuous batching start_pos
        is a LongTensor [B], each row at its own position, and rows [B] names the cache row of each sequence
        (None: 0..B-1), so sequences of any lengths decode together. -> Output."""
        T = idx.size(1)
        cos, sin = self.rope(start_pos, T)
        mask = self.decode_mask(start_pos, T)
        h = self.drop(self.embed(idx))
        if self.hc_head is not None:  # mHC: hc_mult copies of the embedding, one per residual stream
            h = h[:, :, None].expand(-1, -1, self.cfg.hc_mult, -1)
        for layer in self.layers:
            if self.cfg.grad_checkpoint and self.training:
                h = checkpoint(layer, h, cos, sin, None, None, idx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, rows, idx, mask)
        streams = h  # what the MTP modules read: with hc_mult > 1 the streams, before the HyperHead
        if self.hc_head is not None:
            h = self.hc_head(h)
        hidden = streams  # the trunk's output before the final norm: what the MTP modules draft from
        out = self.norm(h)
        if targets is None:
            self.count_routing(sum(i < self.cfg.n_layer for i in self.moe_layer_ids))  # MTP did not run
            return Output(self.head(out) if start_pos is None else self.decode_head(out), None, {}, hidden)
        # the losses come from the states, a chunk at a time; training reads no logits, evaluation's callers do
        logits = None if self.training else self.head(out)
        ce = vocab_cross_entropy(out, self.head.weight, targets)
        mtp, draft_parts = torch.zeros((), device=idx.device), {}
        for k, module in enumerate(self.mtp, start=1):
            # depth k sees h_i and the embedding of t_(i+k) = idx[:, i+k], and predicts targets[:, i+k]
            streams, hn = module(streams[:, :-1], self.embed(idx[:, k:]), cos[..., :T - k, :], sin[..., :T - k, :])
            mtp = mtp + vocab_cross_entropy(hn, self.head.weight, targets[:, k:]) / self.cfg.mtp_depth
            if k == 1 and not self.training:  # at eval, whether drafting will pay: how often depth 1 guesses
                # the data's token, and the trunk's own guess (what a greedy draft must match)
                guess, seen = self.head(hn).argmax(-1), targets[:, 1:] != -1
                draft_parts = {"mtp_acc": (guess == targets[:, 1:])[seen].float().mean(),
                               "mtp_agree": (guess == logits[:, 1:].argmax(-1))[seen].float().mean()}
        aux = sum((m.aux_loss for m in self.moes), torch.zeros((), device=idx.device))
        self.count_routing(len(self.moes))
        parts = {"ce": ce.detach(), "mtp": mtp.detach(), "aux": aux.detach(), **draft_parts}
        loss = ce + self.cfg.mtp_lambda * mtp + aux
        if self.indexed:  # DSA, CSA: the indexers' KL, on their own detached inputs; warming up, nothing else learns
            index = torch.stack([m.index_loss for m in self.indexed]).mean()
            parts["indexer"] = index.detach()
            loss = (loss.detach() if self.warming_up else loss) + self.cfg.index_loss_weight * index
        return Output(logits, loss, parts, hidden)

    def decode_head(self, h):
        """The output head for generation (the trunk's and the drafts'), h [..., D] -> logits [..., V]: CPU BLAS
        computes h @ weight^T for a few rows of a vocabulary-wide head several times slower than h @ head_t, the
        weight's contiguous transpose, in float32, and than weight @ h^T in bf16 (BENCHMARKS.md has the
        timings); it made verifying drafts dearer than decoding."""
        if self.head_t is not None and h.dtype == self.head_t.dtype and not torch.is_grad_enabled():
            return h @ self.head_t
        return (self.head.weight @ h.reshape(-1, h.size(-1)).T).T.reshape(*h.shape[:-1], -1)

    def draft_head(self, h):
        """decode_head for the MTP modules' drafts, h [..., D] -> logits [..., V]: with draft_ids only those tokens
        are scored and the others get -inf, so that a draft reads K rows of a vocabulary-wide head (FR-Spec, Zhao
        et al. 2025: the training data's most frequent tokens cover most of any text). Verification runs the full
        head, so decoding stays exact; a draft can only miss more often."""
        if self.draft_t is None:
            return self.decode_head(h)
        scores = h @ self.draft_t
        return scores.new_full((*h.shape[:-1], self.cfg.vocab_size), float("-inf")).index_copy_(-1, self.draft_ids,
                                                                                                  scores)

    def decode_mask(self, start_pos, T):
        """visible()'s mask of T queries from start_pos against the trunk's rolling caches, which every layer shares:
        built once per decoding forward rather than in each layer. None for a full forward (start_pos None), and
        for attn='hybrid', whose layers see their own window."""
        if start_pos is None or self.cfg.attn == "hybrid":
            return None
        slots = self.layers[0].attn.cache[0].size(1)
        keys = min(start_pos + T, slots) if isinstance(start_pos, int) else slots  # the keys read_cache gives
        return visible(start_pos, T, keys, slots, self.cfg.block_size, self.freqs.device)

    def rope(self, start_pos, T):
        """cos and sin of T positions from start_pos: [T, d/2] each for an int (None: 0), [B, T, d/2] for
        per-row positions start_pos [B]; attn='hybrid' has two, [2, ...]. Positions past the table (block_size)
        are computed."""
        if isinstance(start_pos, torch.Tensor):
            return self.angles(start_pos[:, None] + torch.arange(T, device=start_pos.device))
        pos = start_pos or 0
        if pos + T > self.cos.size(-2):
            return self.angles(torch.arange(pos, pos + T, device=self.freqs.device))
        return self.cos[..., pos:pos + T, :], self.sin[..., pos:pos + T, :]

    def angles(self, positions):
        """rope_angles of positions by self.freqs; for attn='hybrid', of both its RoPEs, stacked [2, ...]."""
        if self.freqs.dim() == 1:
            return rope_angles(positions, self.freqs)
        return tuple(map(torch.stack, zip(*(rope_angles(positions, f) for f in self.freqs))))

    def count_routing(self, n):
        """Add the expert loads of the n MoE layers that ran (the trunk's come first, then MTP's) to the
        counters. Read here rather than in MoE.forward: checkpointing re-runs that in the backward pass."""
        if self.training and n and not self.warming_up:
            self.moe_load[:n] += torch.stack([m.load for m in self.moes[:n]])
            self.moe_dropped[:n] += torch.stack([m.dropped for m in self.moes[:n]])

    def warm_up_indexers(self, on):
        """DSA's dense warm-up (V3.2 report, sec. 2.1.1) while on: attention stays dense (CSA: sees every ready
        compressed entry) and only the indexers learn, by their KL loss to it; the rest of the model is frozen (its
        losses carry no gradient, its routing counts are not kept). Off, the sparse stage: attention reads the
        indexers' picks and everything learns. train.py turns it on for the first index_warmup steps."""
        self.warming_up = on
        for m in self.indexed:
            m.dense = on

    def moe_counts(self):
        """(tokens per expert [n_moe, E], dropped pairs [n_moe]) accumulated since the last update_bias."""
        return self.moe_load, self.moe_dropped

    @torch.no_grad()
    def update_bias(self, loads):
        """Auxiliary-loss-free balancing (V3 eq. 16 ff.): b_i += gamma * sign(mean load - load_i), then reset counts."""
        if self.cfg.bias_update_speed:
            for m, load in zip(self.moes, loads):
                if not m.gate.hashed:  # a hash layer's table, not the bias, picks its experts
                    m.gate.bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)
        self.moe_load.zero_()
        self.moe_dropped.zero_()

    def setup_cache(self, batch, length=None):
        """Allocate empty KV caches of `length` slots for every attention layer (batch 0 frees them), in the
        autocast dtype where autocast is on, so that a bf16 run keeps a bf16 cache, and keep the experts' weights
        cast to it meanwhile (Experts.keep_cast; on a CPU side by side too, MoE.keep_dense), and on a CPU in
        float32 the head's weight transposed (decode_head), and the draft vocabulary's rows of it (draft_head).
        The default length, cache_length(), lets decoding slide past block_size (write_cache)."""
        length = self.cache_length() if length is None else length
        p = self.head.weight
        dtype = compute_dtype(p)
        for layer in [*self.layers, *(m.block for m in self.mtp)]:
            a = layer.attn
            a.cache = [torch.zeros(s, dtype=dtype, device=p.device) for s in a.cache_shapes(batch, length)] if batch else None
        copies = batch and not sharded(self)  # copies of FSDP2's shards would be shards
        for m in self.moes:
            m.experts.keep_cast(dtype if copies else None)
            m.keep_dense(dtype if copies and p.device.type == "cpu" else None)
        self.head_t = p.detach().t().contiguous() if copies and p.device.type == "cpu" and dtype == torch.float32 \
            else None
        ids = self.draft_ids = None if self.draft_ids is None else self.draft_ids.to(p.device)
        self.draft_t = p.detach()[ids].t().contiguous() if copies and ids is not None else None

    def cache_length(self, drafts=0):
        """Slots of a rolling KV cache: block_size - 1 for the window before a step's first query, and room for
        the T positions a decoding step writes (T <= max(mtp_depth, drafts) + 2: the pending token and its drafts,
        the MTP modules' positions), so that a step never overwrites a position its queries or later ones still
        see."""
        return self.cfg.block_size + 1 + max(self.cfg.mtp_depth, drafts)

    def cache_bytes_per_token(self, dtype=None):
        """Bytes the KV cache holds per token over all layers, in dtype (default: the parameters'). Hybrid
        attention's caches hold a fixed number of positions (the window's last keys, the compressors' last tokens,
        the entries of a block): theirs for one row, per token of the cache_length() positions decoding slides
        over, rounded."""
        size = (dtype or self.head.weight.dtype).itemsize
        if self.cfg.attn == "hybrid":
            n = self.cache_length()
            held = sum(math.prod(s) for layer in self.layers for s in layer.attn.cache_shapes(1, n))
            return round(held * size / n)
        a = self.layers[0].attn
        per_layer = sum(math.prod(s[2:]) for s in a.cache_shapes(1, 1))
        return per_layer * self.cfg.n_layer * size

    def num_params(self, active=False):
        """Parameters of the model (MTP included); active=True counts K of E routed experts per MoE layer."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.moes:
                n -= sum(w.numel() for w in m.experts.parameters()) * (1 - m.topk / m.n_experts)
        return int(n)

    def param_report(self):
        """Total, active per token, and a breakdown by kind of parameter, as a printable table."""
        kinds = {"attention": 0, "dense MLP": 0, "routed experts": 0, "shared experts": 0, "router": 0,
                 "embeddings": 0, "norms": 0, "MTP": 0, "mHC": 0}
        for name, p in self.named_parameters():
            kind = ("MTP" if name.startswith("mtp.") else "mHC" if "hc_" in name else
                    "routed experts" if ".experts." in name else "shared experts" if ".shared_experts." in name else
                    "router" if ".gate." in name else "norms" if "norm" in name else
                    "attention" if ".attn." in name else "dense MLP" if ".ffn." in name else "embeddings")
            kinds[kind] += p.numel()
        total, active = self.num_params(), self.num_params(active=True)
        lines = [f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token"]
        lines += [f"  {k:<15} {v / 1e6:9.3f}M ({100 * v / total:4.1f}%)" for k, v in kinds.items() if v]
        lines.append(f"  KV cache: {self.cache_bytes_per_token():g} bytes/token ({self.cfg.attn})")
        return "\n".join(lines)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per active weight outside the input embedding, the shared output head
        once more per MTP depth, plus attention's scores and weighted sum over a full block (the PaLM
        appendix B convention, as nanoGPT uses)."""
        c = self.cfg
        n = self.num_params(active=True) - (0 if c.tie_embeddings else self.embed.weight.numel())
        n += c.mtp_depth * self.head.weight.numel()
        qk, v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attn == "mla" else (c.n_embd // c.n_head,) * 2
        if c.attn == "hybrid":  # the keys of the last query: the window and its compressed entries; CSA's index
            L, d = c.block_size, c.qk_nope_head_dim + c.qk_rope_head_dim  # scores, forward only (no gradient)
            keys = {"sliding": 0, "csa": min(c.index_topk, L // c.csa_rate), "hca": L // c.hca_rate}
            index = {"sliding": 0, "csa": 2 * c.index_n_heads * c.index_head_dim * (L // c.csa_rate), "hca": 0}
            return int(6 * n + sum(6 * c.n_head * 2 * d * (min(c.sliding_window, L) + keys[t]) + index[t]
                                   for t in c.layer_types + ["sliding"] * c.mtp_depth))
        return int(6 * n + 6 * (c.n_layer + c.mtp_depth) * c.n_head * (qk + v) * c.block_size)
