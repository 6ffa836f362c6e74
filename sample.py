"""
Sample from a trained model, streaming the text to stdout as it is generated:

    python sample.py --out_dir=out-shakespeare-moe --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0      # greedy, prompt read from a file

The checkpoint is out_dir/best.pt where it exists, else out_dir/ckpt.pt, or --ckpt=PATH. The tokenizer is
the one the model was trained with: the checkpoint's "meta", else data/DATASET/meta.json of its dataset.
Generation goes through generate.py, the decoder the server shares, with the KV cache (for MLA the compressed
latent c_KV and the shared rope key, attended in absorbed form). The context is the model's block_size: a
longer prompt keeps its last block_size tokens (with a warning), and generation past the context slides: each
token sees itself and the block_size - 1 before it, the caches rolling windows (generate.py says how). A model
configured with block_size > original_seq_len already covers its block_size with YaRN; the window slides
beyond that. With --speculative the model's MTP modules draft tokens that one forward of the trunk verifies
(generate.Decoder; --drafts a step, past mtp_depth the last module drafting again from its own output): the same
greedy text, the same distribution when sampling, fewer forwards.
Tokens/s, the cache size and the drafts' acceptance rate go to stderr (--quiet: nothing but the text).
"""
import sys
import time
from contextlib import nullcontext

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import torch

from checkpoint import load_for_generation
from common import DTYPES, autocast, fail
from configurator import at_least, between, configure, one_of
from generate import settled, stream as decode
from tokenizer import PromptError, encode_prompt

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-char-moe'  # the training run to sample from: its best.pt, else its ckpt.pt
ckpt = ''  # a checkpoint file; overrides out_dir
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 1  # samples to draw, one after another
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 0 = greedy; below 1 sharper, above 1 flatter
top_k = 200  # sample among the top_k most likely tokens; 0 = all
top_p = 1.0  # sample among the fewest tokens with this much probability
presence_penalty = 0.0  # subtracted from the logit of every token already generated (OpenAI's, -2 to 2)
frequency_penalty = 0.0  # subtracted once per time a token was already generated (OpenAI's, -2 to 2)
logit_bias = ''  # token id:bias pairs added to the logits, e.g. '11:-100,13:5' (OpenAI's logit_bias, -100 to 100)
seed = 1337  # the same seed gives the same text
device = ''  # '' = cuda, else mps, else cpu; or e.g. cuda:1
dtype = 'auto'  # float32, bfloat16 or float16 autocast; auto = bf16 on GPUs, float32 on CPUs (common.pick_dtype)
compile = False  # torch.compile the model (a minute or more of compiling first)
use_cache = True  # False: recompute every token that reaches the next one (the same text, slower)
speculative = False  # MTP modules draft tokens, one forward verifies them: the same text distribution, faster
drafts = 0  # with --speculative, tokens drafted a step; 0 = mtp_depth and at least 2 (the last MTP module chained)
quiet = False  # nothing on stderr but errors
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
RULES = dict(num_samples=at_least(1), max_new_tokens=at_least(1), temperature=at_least(0), top_k=at_least(0),
             top_p=between(0, 1, open_low=True), seed=between(0, 2 ** 63 - 1), dtype=one_of(*DTYPES),
             presence_penalty=between(-2, 2), frequency_penalty=between(-2, 2), drafts=at_least(0))


def parse_bias(text, vocab_size):
    """--logit_bias 'ID:BIAS,ID:BIAS' -> {id: bias}, as the server's logit_bias field."""
    bias = {}
    for pair in filter(None, text.split(',')):
        try:
            token, value = pair.split(':')
            token, value = int(token), float(value)
        except ValueError:
            fail(f"--logit_bias={text}: write token id:bias pairs separated by commas, e.g. '11:-100,13:5'")
        if not (0 <= token < vocab_size and -100 <= value <= 100):
            fail(f"--logit_bias={text}: {pair} needs a token id below the vocabulary's {vocab_size} and a bias "
                 f"from -100 to 100")
        bias[token] = value
    return bias


def read_prompt(start):
    """--start: the text itself, or FILE:path for the text in a file."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--start=FILE:{path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})")


def stream(model, tok, ids, max_new_tokens, write, ctx=nullcontext(), **options):
    """Generate max_new_tokens after ids (generate.stream's options), write()-ing the decoded text as each token
    arrives (tokenizer.Text). Text that ends in half a character (a byte-level BPE token split a UTF-8 sequence)
    waits for the rest (generate.settled). Returns the new tokens."""
    new, shown, text = [], 0, tok.text()
    with ctx:
        for token in decode(model, torch.tensor([ids], device=model.head.weight.device), max_new_tokens, **options):
            new.append(token.item())
            text.add(new[-1])
            final = len(new) == max_new_tokens
            end = settled(text.finish() if final else text.text, shown, final)
            write(text.text[shown:end])
            shown = end
    return new


def main(argv=None):
    c, _ = configure(DEFAULTS, sys.argv[1:] if argv is None else argv, __doc__, [__file__], RULES)
    say = (lambda *x: None) if c['quiet'] else (lambda *x: print(*x, file=sys.stderr, flush=True))
    if c['speculative'] and not c['use_cache']:
        fail("--speculative verifies drafts against the KV cache: it cannot run with --use_cache=False")
    path, model, ckpt_dict, tok, meta, dev, dt = load_for_generation(c, 'sample')
    say(f"{path} (iter {ckpt_dict.get('iter_num', '?')}), {model.num_params() / 1e6:.2f}M parameters, "
        f"tokenizer {meta.get('tokenizer')}, {dev} {dt}")
    block_size = model.cfg.block_size
    try:
        ids, n = encode_prompt(tok, meta, read_prompt(c['start']), block_size)
    except PromptError as e:
        fail(str(e))
    if n > block_size:  # a warning even with --quiet
        print(f"warning: the prompt is {n} tokens, longer than the model's context of {block_size}: "
              f"cropped to its last {block_size} tokens", file=sys.stderr)
    if c['compile']:
        model.compile()  # in place: generate's calls of model(...) run compiled
    torch.manual_seed(c['seed'])
    speculation = {'drafted': 0, 'accepted': 0}
    options = dict(temperature=c['temperature'], top_k=c['top_k'], top_p=c['top_p'], use_cache=c['use_cache'],
                   speculative=c['speculative'], drafts=c['drafts'] or None, speculation=speculation, presence_penalty=c['presence_penalty'],
                   frequency_penalty=c['frequency_penalty'],
                   logit_bias=parse_bias(c['logit_bias'], model.cfg.vocab_size))
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())
    n_tokens, seconds = 0, 0.0
    for k in range(c['num_samples']):
        if k:
            write("\n---------------\n")
        write(tok.decode(ids))
        t0 = time.perf_counter()
        n_tokens += len(stream(model, tok, ids, c['max_new_tokens'], write, autocast(dev, dt), **options))
        seconds += time.perf_counter() - t0
    write("\n")
    if c['speculative']:
        drafted, accepted = speculation['drafted'], speculation['accepted']
        say(f"speculative decoding: {accepted} of {drafted} drafted tokens accepted "
            f"({100 * accepted / max(drafted, 1):.1f}%), {c['drafts']} drafted per step")
    cache = model.cache_bytes_per_token(getattr(torch, dt))
    say(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s (with decoding and printing); "
        f"KV cache {cache:,} bytes/token, {cache * model.cfg.block_size / 2**20:.2f} MiB for the "
        f"{model.cfg.block_size}-token context" if c['use_cache'] else "no KV cache (--use_cache=False)")


if __name__ == "__main__":
    main()
