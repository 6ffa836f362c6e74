# SmolLM2-135M's trunk with DeepSeek's MLA and DeepSeekMoE, as one seed builds it (about 373M
# parameters): every layer's MLP becomes 1 shared + 3 routed experts of SmolLM2's full MLP width,
# top-1, and attention goes through an 8x compressed key/value latent. For a GPU.
# That seed lost its run to NaN losses at lr 3e-3: here non-finite steps are skipped, and after
# nan_patience of them in a row the run goes back to the last checkpoint at half the learning rate.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'smollm2_135m.py')).read())
out_dir = 'out-deepseek-smollm2'
attn = 'mla'
kv_lora_rank = 72  # 576 / 8
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_dense_layers = 0
n_routed_experts = 3
n_activated_experts = 1
n_shared_experts = 1
moe_inter_dim = 1536
