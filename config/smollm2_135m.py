# SmolLM2-135M, dense (Llama architecture): 30 layers, 576 wide, 9 heads sharing 3 key/value heads,
# SwiGLU 1536, tied embeddings, RoPE base 100000, vocabulary 49152 (its own tokenizer). For a GPU.
# Data in SmolLM2's tokenizer, from a local copy of its tokenizer files (docs/training.md), e.g. of Tiny Shakespeare's input.txt:
# hf download HuggingFaceTB/SmolLM2-135M tokenizer.json tokenizer_config.json --local-dir=SmolLM2-135M
# python prepare.py text --input=input.txt --tokenizer=SmolLM2-135M --name=shakespeare_smollm2
out_dir = 'out-smollm2-135m'
dataset = 'shakespeare_smollm2'
eval_interval = 500
eval_iters = 50
log_interval = 10
sample_interval = 500
sample_prompt = 'Before we proceed any further,'  # the seeds' prompt

n_layer = 30
n_embd = 576
n_head = 9
attn = 'gqa'
n_kv_head = 3
inter_dim = 1536
tie_embeddings = True
vocab_size = 49152  # its tokenizer's: bench.py sizes the model without the dataset
rope_theta = 100000.0
norm_eps = 1e-5
n_routed_experts = 0  # dense

block_size = 2048
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 5000
learning_rate = 3e-3
warmup_iters = 200
min_lr = 3e-4
weight_decay = 0.01
