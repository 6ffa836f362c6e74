# Character-level Tiny Shakespeare, dense baseline: nanoGPT's documented CPU recipe (4 layers, 4 heads,
# 128 wide, block 64, batch 12, lr 1e-3, dropout 0; val loss 1.8857 in about 3 minutes on 2 cores), here
# with MLA attention and a SwiGLU MLP, trained for 3 minutes on whatever machine runs it (max_time).
# shakespeare_char_moe.py is the same model with DeepSeekMoE at the same active parameters per token.
# On a GPU: --batch_size=64 --block_size=256 --n_layer=6 --n_head=6 --n_embd=384 --dropout=0.2 --max_iters=5000 --compile=True
out_dir = 'out-shakespeare-char-dense'
dataset = 'shakespeare_char'  # python prepare.py shakespeare_char
eval_interval = 500
eval_iters = 20
log_interval = 10
sample_interval = 1000

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
kv_lora_rank = 64  # MLA with 32-dim heads: a 64-dim latent c_KV and a 16-dim rope key
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
n_routed_experts = 0  # dense

block_size = 64
batch_size = 12
max_time = 180  # seconds, evals included: max_iters is fixed after timing the first steps, and the lr decays to it
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99  # nanoGPT's choice for few tokens per iteration
warmup_iters = 100
# dtype 'auto': bf16 autocast on CPUs with bf16 instructions, measured faster here (see pick_dtype)
