# Character-level Tiny Shakespeare with DeepSeekMoE, the model `make demo` trains: shakespeare_char_dense.py
# with the same 3-minute budget (max_time), its dense MLP replaced after the first layer by 1 shared + 8
# routed experts (top-2), each a third of the dense width: the same active parameters per token, about twice
# the total. Each of the two does as many steps as fit in the budget on the machine that runs it.
# On a GPU: --batch_size=64 --block_size=256 --n_layer=6 --n_head=6 --n_embd=384 --dropout=0.2 --max_iters=5000 --compile=True
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_char_dense.py')).read())
out_dir = 'out-shakespeare-char-moe'
n_routed_experts = 8
n_activated_experts = 2
n_shared_experts = 1
n_dense_layers = 1
