# Speculative decoding where it pays: the BPE demo (shakespeare_moe.py) with a 24-layer trunk and one Multi-Token
# Prediction module (V3 sec. 2.2), whose drafts one forward of the trunk verifies (sample.py --speculative).
# At batch 1 a decoding step costs each layer's fixed cost plus the 50k-wide head; a draft costs one block and a
# head over the data's most frequent tokens, a small share of a 24-layer step (a third of the demo's 4-layer one).
# bench.py --only=generate times it; about 40 minutes of training on 2 CPU cores (a budget on the command line
# wins over max_iters):
#   python prepare.py shakespeare
#   python train.py config/shakespeare_mtp.py --max_time=2400
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shakespeare_moe.py')).read())
out_dir = 'out-shakespeare-mtp'
n_layer = 24
mtp_depth = 1
learning_rate = 1e-3  # deeper than the demo: a lower rate
min_lr = 1e-4
max_iters = 2000
