# Character-level Tiny Shakespeare with DeepSeek-V4's parts (docs/deepseek-v4.md) at the demo's size:
# shakespeare_char_moe.py's widths, depth, experts and 3-minute budget, with V4's hybrid attention (a sliding
# window in every layer, CSA or HCA compressed branches in some), 4 hyper-connection streams (mHC), sqrt-softplus
# routing with a hash-routed first layer, and the SwiGLU clamp. Exports as DeepseekV4ForCausalLM.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char_moe.py')).read())
dataset = 'shakespeare_char'  # python prepare.py shakespeare_char
out_dir = 'out-shakespeare-char-v4'
attn = 'hybrid'  # V4's attention: a sliding window per layer, plus what layer_types adds
layer_types = ['sliding', 'csa', 'hca', 'csa']  # per layer: window only, + top-k of entries of 4 tokens, + all entries of 16
sliding_window = 16  # the last 16 tokens are seen uncompressed (a quarter of the 64-token block)
csa_rate = 4  # CSA: 4 tokens per compressed entry, 16 entries per block
index_topk = 8  # CSA: the lightning indexer keeps 8 of them per query
index_n_heads = 4  # CSA's indexer: 4 heads
index_head_dim = 32  # CSA's indexer: 32 dims per head
hca_rate = 16  # HCA: 16 tokens per compressed entry, 4 per block
q_lora_rank = 64  # queries from a 64-dim latent, as in V4 (and MLA with q_lora)
qk_nope_head_dim = 24  # 32-dim heads, keys = values: 24 dims without position...
qk_rope_head_dim = 8  # ...and 8 with RoPE (V4: 64 of 512)
o_groups = 2  # grouped output projection: 2 groups of 2 heads...
o_lora_rank = 64  # ...each projected to 64 dims before the mix to n_embd
hc_mult = 4  # 4 residual streams mixed by mHC, as V4
n_dense_layers = 0  # V4 has no dense layers: every layer is MoE
n_hash_layers = 1  # the first layer picks experts by a frozen token -> experts table
score_func = 'sqrtsoftplus'  # V4's router scores
route_scale = 1.5  # V4-Flash's routed_scaling_factor
swiglu_limit = 10.0  # V4's clamp of the experts' SwiGLU inputs
