# One seed's tiny DeepSeek-V3: 12 layers, 768 wide, 12 heads, 8 routed experts top-2, here with V3's
# other parts at small scale: MLA with compressed queries, 1 shared expert, sigmoid routing with
# auxiliary-loss-free balancing, one dense layer first, and one Multi-Token Prediction module.
# Tiny Shakespeare, GPT-2 tokenizer, context 512, as the seed. For a GPU.
out_dir = 'out-deepseek-v3-tiny'
dataset = 'shakespeare'  # python prepare.py shakespeare
eval_interval = 250
eval_iters = 50
log_interval = 10
sample_interval = 500
sample_prompt = 'ROMEO:\n'

n_layer = 12
n_embd = 768
n_head = 12
q_lora_rank = 384
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_dense_layers = 1
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
score_func = 'sigmoid'
mtp_depth = 1
dropout = 0.1  # Tiny Shakespeare is small for 12 layers

block_size = 512
batch_size = 4
gradient_accumulation_steps = 4
max_iters = 5000
learning_rate = 5e-4
warmup_iters = 200
min_lr = 5e-5
