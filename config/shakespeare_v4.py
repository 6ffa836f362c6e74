# Tiny Shakespeare with the GPT-2 tokenizer and DeepSeek-V4's parts (docs/deepseek-v4.md): the BPE counterpart
# of the character-level shakespeare_char_v4, shakespeare_moe.py's run (widths, depth, experts, schedule) with
# V4's hybrid attention, 4 hyper-connection streams (mHC), sqrt-softplus routing with a hash-routed first layer
# and the SwiGLU clamp. Exports as DeepseekV4ForCausalLM.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_moe.py')).read())
dataset = 'shakespeare'  # python prepare.py shakespeare
out_dir = 'out-shakespeare-v4'
tie_embeddings = False  # V4 has its own output head (DeepseekV4ForCausalLM ties nothing): 6.4M more parameters
attn = 'hybrid'  # V4's attention: a sliding window per layer, plus what layer_types adds
layer_types = ['sliding', 'csa', 'hca', 'csa']  # per layer: window only, + top-k of entries of 4 tokens, + all entries of 16
sliding_window = 32  # the last 32 tokens are seen uncompressed (a quarter of the 128-token block)
csa_rate = 4  # CSA: 4 tokens per compressed entry, 32 entries per block
index_topk = 8  # CSA: the lightning indexer keeps 8 of them per query
index_n_heads = 4  # CSA's indexer: 4 heads
index_head_dim = 32  # CSA's indexer: 32 dims per head
hca_rate = 16  # HCA: 16 tokens per compressed entry, 8 per block
q_lora_rank = 64  # queries from a 64-dim latent, as in V4
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
