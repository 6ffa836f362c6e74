# A small DeepSeek-style model, MLA attention and DeepSeekMoE, on Tiny Shakespeare with the GPT-2 tokenizer:
# the BPE counterpart of shakespeare_char_moe.py (compare their val bits per byte). It runs on a CPU; on a
# GPU, for a better model, try --max_iters=5000 --batch_size=32 --block_size=256 --n_layer=6 --n_embd=384.
out_dir = 'out-shakespeare-moe'
dataset = 'shakespeare'  # python prepare.py shakespeare
eval_interval = 100
eval_iters = 10
log_interval = 10
sample_interval = 250  # and at the end
sample_prompt = 'ROMEO:\n'
sample_tokens = 100

# the 50257x128 token embedding is most of the parameters and the output head most of the compute:
# tie the two, as SmolLM2 does, and keep the trunk small
n_layer = 4
n_embd = 128
n_head = 4
tie_embeddings = True
# MLA: keys and values through a 64-dim latent (the KV cache) plus a 16-dim shared rope key
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
# DeepSeekMoE after one dense layer: 8 routed experts, top-2, plus 1 shared; each expert a third of
# the dense width, so a token uses as many FFN parameters as in a dense model
n_dense_layers = 1
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1

block_size = 128
batch_size = 8
max_iters = 500
learning_rate = 2e-3  # small models take a high rate
warmup_iters = 50
min_lr = 2e-4
# dtype 'auto': bf16 autocast on CPUs with bf16 instructions, measured faster here (see pick_dtype)
