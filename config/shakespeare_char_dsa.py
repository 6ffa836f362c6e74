# Character-level Tiny Shakespeare at a long context with DeepSeek Sparse Attention (DeepSeek-V3.2): the model of
# shakespeare_char_dense.py with a 1024-character block, each query attending only to the 128 earlier characters
# its lightning indexer picks (every character before position 128). From scratch, sparse from the first step;
# docs/sparse-attention.md trains the same model dense (--index_topk=0) and takes the report's route from it.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char_dense.py')).read())
out_dir = 'out-shakespeare-char-dsa'
block_size = 1024  # long enough that the picks matter: 128 of up to 1023 earlier characters
batch_size = 4  # 4096 characters per step
eval_iters = 4  # 16k characters per split, about what the 64-character configs evaluate (20 x 12 x 64)
q_lora_rank = 64  # DSA's indexer reads MLA's query latent, so queries are compressed
index_topk = 128  # characters each query attends to: an eighth of the block
index_n_heads = 4  # indexer heads, each a ReLU score (V3.2: 64); few, as it scores every pair of characters
index_head_dim = 32  # indexer query/key dims, the first 16 turned by RoPE (V3.2: 128)
index_warmup = 0  # from scratch nothing to warm up to; after convert.py add-indexers, the dense warm-up's steps
