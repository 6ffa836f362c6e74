# One seed's WikiText model: 8 layers, 512 wide, 8 heads sharing 2 key/value heads (GQA), MoE at layers
# 2, 4 and 6 with 4 experts (top-2) and capacity factor 2, GPT-2 tokenizer, context 512. For a GPU.
# Data (docs/training.md), into data/wikitext:
# python prepare.py hf --dataset=Salesforce/wikitext --config=wikitext-103-raw-v1 --name=wikitext
out_dir = 'out-wikitext-moe'
dataset = 'wikitext'
eval_interval = 500
eval_iters = 100
log_interval = 10
sample_interval = 1000
sample_prompt = 'The history of'

n_layer = 8
n_embd = 512
n_head = 8
attn = 'gqa'
n_kv_head = 2
inter_dim = 2048  # the dense layers' SwiGLU width
moe_layers = [2, 4, 6]
n_routed_experts = 4
n_activated_experts = 2
n_shared_experts = 0
moe_inter_dim = 2048  # each expert as wide as the dense MLP, as in the seed
capacity_factor = 2.0  # tokens beyond twice an expert's even share are dropped (and counted)

block_size = 512
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 10000
learning_rate = 6e-4
warmup_iters = 500
min_lr = 6e-5
