# One seed's run: a 774M-parameter MoE on Cosmopedia v2. 30 layers, 576 wide, 9 heads sharing 3
# key/value heads, 8 routed + 1 shared experts (top-2) of width 1536 in every layer, context 2048,
# SmolLM2's 49152-token vocabulary, tied embeddings; lr 3e-3 with warmup and decay, weight decay 0.01,
# clipping at 1.0, AdamW (0.9, 0.95), bf16. For GPUs: torchrun --nproc_per_node=8 train_ddp.py config/cosmopedia_774m.py
# Data (docs/training.md): SmolLM2's tokenizer files, then the corpus in it, into data/cosmopedia:
# hf download HuggingFaceTB/SmolLM2-135M tokenizer.json tokenizer_config.json --local-dir=SmolLM2-135M
# python prepare.py hf --dataset=HuggingFaceTB/smollm-corpus --config=cosmopedia-v2 --tokenizer=SmolLM2-135M --name=cosmopedia --max_tokens=2_000_000_000
out_dir = 'out-cosmopedia-774m'
dataset = 'cosmopedia'
eval_interval = 500
eval_iters = 50
log_interval = 10
sample_interval = 500
sample_prompt = 'Once upon a time,'

n_layer = 30
n_embd = 576
n_head = 9
attn = 'gqa'
n_kv_head = 3
tie_embeddings = True
rope_theta = 100000.0
norm_eps = 1e-5
n_dense_layers = 0
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
moe_inter_dim = 1536

block_size = 2048
batch_size = 8
gradient_accumulation_steps = 8  # over all processes: 8 x 8 x 2048 = 131k tokens per step
max_iters = 10000
learning_rate = 3e-3
warmup_iters = 500
min_lr = 3e-4
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dtype = 'bfloat16'
