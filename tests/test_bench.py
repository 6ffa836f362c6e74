"""bench.py runs end to end and writes a bench.json that others can read. No timing is asserted:
bench.py measures, tests only check that it works."""
import json
import math
import os
import subprocess
import sys

import pytest

import bench
import train
from conftest import script_error
from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a train.py stand-in for arch: it keeps the arguments it got (as NAME.json beside itself) and writes the
# metrics.jsonl rows of a run: val loss by model, val_bpb on some eval rows only
STAND_IN = """import json, os, sys
args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--'))
with open(os.path.join(os.path.dirname(__file__), os.path.basename(args['out_dir']) + '.json'), 'w') as f:
    json.dump(sys.argv[1:], f)
val = 1.9 if args.get('attn') == 'gqa' else 1.5 if 'moe' in sys.argv[1] else 1.6
os.makedirs(args['out_dir'])
with open(os.path.join(args['out_dir'], 'metrics.jsonl'), 'w') as f:
    for row in [dict(iter=10, loss=2.5), dict(iter=20, val_loss=val + 0.2, val_bpb=3.0),
                dict(iter=40, val_loss=val, **({} if args.get('attn') else dict(val_bpb=val * 1.4))),
                dict(iter=50, val_loss=val + 0.1, val_bpb=3.0), dict(iter=55, loss=1.0)]:
        f.write(json.dumps(row) + '\\n')
"""


def bench_run(tmp_path, *args):
    """bench.py in a child process on one thread: several crawl on a machine shared with other jobs."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), f"--out={tmp_path / 'bench.json'}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def figures(tmp_path):
    out = json.loads((tmp_path / "bench.json").read_text())
    return out["info"], {row["name"]: row for row in out["results"]}


def dataset(root, name, vocab_size, **meta):
    """data_dir/name/meta.json, all that train, generate and arch read of a dataset (the stand-in trains on nothing)."""
    os.makedirs(root / name)
    (root / name / "meta.json").write_text(json.dumps(dict(vocab_size=vocab_size, **meta)))


def test_help_lists_every_option_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--max_time=150  arch:" in out and "--quick=False  smaller" in out


def test_a_bad_option_or_an_unwritable_out_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_moe", lambda o: pytest.fail("a section ran"))
    for args in (["--nope=1"], ["--only=moe,nope"], ["--reps=many"], ["--dtype=fp8"], ["--out=missing/dir/x.json"],
                 [f"--out={tmp_path}"]):
        assert script_error(capsys, bench.main, "--only=moe", f"--out={tmp_path / 'bench.json'}", *args)
        assert not list(tmp_path.iterdir()), args  # no bench.json, no leftover bench.json.tmp


def test_quick_sections_write_their_figures_and_skip_configs_whose_vocabulary_is_unknown(tmp_path):
    data = tmp_path / "data"
    dataset(data, "shakespeare_char", 65)  # no data/shakespeare: shakespeare_moe.py's vocabulary is not guessed
    r = bench_run(tmp_path, "--quick", "--only=train,generate,moe", "--reps=1", f"--data_dir={data}", "--device=cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    info, rows = figures(tmp_path)
    assert {"command", "machine", "torch", "date", "train_s", "generate_s", "moe_s"} <= info.keys()
    assert "bf16 instructions" in info["machine"]
    assert {row["section"] for row in rows.values()} == {"train", "generate", "moe"}
    for name in ("shakespeare_char_moe.py: moe / dense time per iter (eager)",
                 "shakespeare_char_moe.py: 256 new tokens, cache speed-up over recompute",
                 "shakespeare_char_moe.py: 256 new tokens, MoE decoding speed / dense twin",
                 "768 tok x 128 wide, 8 experts of 128: loop / dense",
                 "4096 tok x 256 wide, 8 experts of 234: loop / dense"):
        assert math.isfinite(rows[name]["value"]) and rows[name]["value"] > 0, name
    for layer in ("768 tok x 128 wide, 8 experts of 128", "4096 tok x 256 wide, 8 experts of 234",
                  "4096 tok x 256 wide, 8 experts of 256"):  # the goal is on the path Experts.impl='auto' takes
        assert [r["goal"] is not None for n, r in rows.items() if n.startswith(layer)].count(True) == 1, layer
    assert "skipped config/shakespeare_moe.py: no " in " ".join(rows)
    assert rows["shakespeare_char_moe.py: moe memory (weights+grads+adam+saved)"]["total_params"] > \
        rows["shakespeare_char_moe.py: moe memory (weights+grads+adam+saved)"]["active_params"]
    # the config sets nothing else, so a 65-token vocabulary means meta.json's: the embedding is 65 x 128
    assert rows["shakespeare_char_moe.py: dense memory (weights+grads+adam+saved)"]["total_params"] < 1_000_000
    # cache sizes need no vocabulary: every config, prepared or not
    assert rows["deepseek_smollm2.py: cache B/token/layer bf16, MLA, MHA, GQA 3 kv heads"]["value"] == "208 / 2304 / 768"


def test_prepare_writes_tokens_per_second_and_peak_memory(tmp_path):
    r = bench_run(tmp_path, "--quick", "--only=prepare", "--corpus_mb=2", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = figures(tmp_path)
    speed = rows["synthetic 2 MB (hf jsonl, streamed): tokens/s"]
    assert speed["tokens"] > 100_000 and speed["value"] > 0  # 2 MB of English-like words, a few hundred thousand tokens
    peaks = [rows[f"synthetic {mb} MB: peak memory"]["value"] for mb in (1, 2)]
    assert all(math.isfinite(p) and 10 < p < 10_000 for p in peaks)  # MiB of the prepare.py process itself
    assert "skipped Tiny Shakespeare" in " ".join(rows)


def test_arch_gives_every_model_the_same_max_time_and_reads_best_val_loss_and_bpb_from_metrics(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(STAND_IN)
    monkeypatch.setattr(bench, "TRAIN", str(tmp_path / "train.py"))
    dataset(tmp_path / "data", "shakespeare_char", 65, source="input.txt")
    bench.main(["--only=arch", "--max_time=7", "--dtype=float32", f"--data_dir={tmp_path / 'data'}",
                f"--out={tmp_path / 'bench.json'}"])
    _, rows = figures(tmp_path)
    for name, val, bpb in (("moe", 1.5, 2.1), ("dense", 1.6, 1.6 * 1.4), ("nanogpt", 1.9, None)):
        best = rows[f"{name}: best val loss in 7 s (float32)"]
        assert (best["value"], best["iter"], best["data_source"]) == (val, 40, "input.txt")
        assert rows[f"{name}: val bits per byte at that eval"]["value"] == pytest.approx(bpb)  # None: a row without it
        assert [r for r in rows.values() if r["name"].startswith(f"{name}: iterations")][0]["value"] == 55
        args = json.loads((tmp_path / f"{name}.json").read_text())  # what the run got
        assert {"--max_time=7", "--dtype=float32", "--dataset=shakespeare_char", "--sample_interval=0"} <= set(args)
        assert ("--attn=gqa" in args and "--n_kv_head=4" in args) == (name == "nanogpt")
    assert rows["MoE below its dense twin and nanoGPT's 1.8857 - 0.2"]["ok"] is True
    # what the stand-in does not check: train.py takes the nanoGPT shape, multi-head and dense with a 4x MLP
    c = configure(train.DEFAULTS, [os.path.join(ROOT, a) if a.endswith(".py") else a for a in bench.ARCH["nanogpt"]])[0]
    assert (c["attn"], c["n_kv_head"], c["n_head"], c["inter_dim"], c["n_routed_experts"]) == ("gqa", 4, 4, 4 * 128, 0)


def test_v4_trains_v4_and_v3_for_the_same_seconds_and_times_mhc_per_step(tmp_path, monkeypatch, one_thread):
    (tmp_path / "train.py").write_text(STAND_IN)
    monkeypatch.setattr(bench, "TRAIN", str(tmp_path / "train.py"))
    dataset(tmp_path / "data", "shakespeare_char", 65, source="input.txt")
    bench.main(["--only=v4", "--quick", "--reps=1", "--max_time=7", "--dtype=float32", "--device=cpu",
                f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'bench.json'}"])
    _, rows = figures(tmp_path)
    for name, val, config in (("moe", 1.5, "shakespeare_char_moe"), ("v4", 1.6, "shakespeare_char_v4")):
        assert rows[f"{name}: best val loss in 7 s (float32)"]["value"] == val
        args = json.loads((tmp_path / f"{name}.json").read_text())
        assert args[0] == f"config/{config}.py" and "--max_time=7" in args
    assert rows["v4 - moe best val loss in 7 s (below 0: V4's parts win)"]["value"] == pytest.approx(0.1)
    for name in ("mHC's cost: v4 (hc_mult=4) / v4 hc_mult=1 time per step", "v4 / moe time per step"):
        assert math.isfinite(rows[name]["value"]) and rows[name]["value"] > 0, name


def test_budget_times_each_char_config_from_start_to_exit_against_its_max_time(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(STAND_IN + "import time\ntime.sleep(0.5)\n")
    monkeypatch.setattr(bench, "TRAIN", str(tmp_path / "train.py"))
    dataset(tmp_path / "data", "shakespeare_char", 65)
    bench.main(["--only=budget", "--budget_time=2", "--dtype=float32", f"--data_dir={tmp_path / 'data'}",
                f"--out={tmp_path / 'bench.json'}"])
    _, rows = figures(tmp_path)
    for name in ("moe", "dense"):
        wall = rows[f"char {name}: --max_time=2 (float32), wall clock start to exit"]
        over = rows[f"char {name}: overshoot of --max_time=2 (float32)"]
        assert wall["value"] >= 0.5 and wall["iters"] == 55  # the stand-in sleeps 0.5 s; its last row is 55
        assert over["value"] == pytest.approx(100 * (wall["value"] - 2) / 2) and over["goal"] == "within 5%"
        args = json.loads((tmp_path / f"{name}.json").read_text())
        assert args[0] == f"config/shakespeare_char_{name}.py" and "--max_time=2" in args


def test_bench_imports_no_script():
    """Scripts import library modules, never each other: bench.py reads train.py's keys without importing it."""
    imported = subprocess.run([sys.executable, "-c", "import sys, bench; print(sorted(sys.modules))"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    assert not {"'train'", "'sample'", "'serve'", "'prepare'"} & set(imported.strip("[]\n").split(", "))


def test_serve_drives_the_real_server_with_1_4_and_8_streaming_clients(tmp_path):
    bench.main(["--only=serve", "--quick", f"--out={tmp_path / 'bench.json'}"])
    rows = figures(tmp_path)[1]
    for n in (1, 4, 8):
        assert rows[f"aggregate tokens/s, {n} streaming clients"]["value"] > 0
    assert rows["aggregate tokens/s, 8 clients / 1 client"]["goal"] == ">= 6x"
    # one greedy stream beside sample.py's decoding of the same model (issue 27's goal)
    ratio = rows["one client / sample.py decode"]
    assert ratio["goal"] == ">= 0.8x" and ratio["value"] > 0
    assert rows["sample.py decode tokens/s, greedy"]["value"] > 0
    assert "time per output token, 8 clients, p99" in rows
    # the engine without HTTP beside it, which tells the batching's share of the 8-client ratio from HTTP's
    assert rows["engine alone (no HTTP), 8 sequences submitted together / 1"]["value"] > 0
    # a short and a long prompt: 256 tokens, or the context of a trained checkpoint beside bench.py
    assert len([k for k in rows if k.startswith("time to first token")]) == 2


def test_speculative_rows_time_a_checkpoint_with_mtp_and_skip_one_without(tmp_path, one_thread):
    import bench_speculative
    from conftest import save_model
    with_mtp = save_model(str(tmp_path / "mtp" / "ckpt.pt"), mtp_depth=1)
    save_model(str(tmp_path / "plain" / "ckpt.pt"))
    rows = {name: (value, extra) for name, value, _, extra in bench_speculative.bench_generate_speculative(
        True, {"char": os.path.dirname(with_mtp), "bpe": str(tmp_path / "plain")})}
    for drafts in ("2 drafts", "1 draft"):  # the default, the one module chained, and the module alone
        speedup = rows[next(n for n in rows if n.startswith(f"char: 256 new tokens, greedy, speculative, {drafts} a step:"
                                                              " speed-up"))]
        assert speedup[0] > 0 and 0 <= speedup[1]["acceptance"] <= 1
    assert rows["char: 256 new tokens, greedy, plain"][0] > 0
    assert any(n.startswith("bpe: skipped") and "no MTP modules" in n for n in rows)


# train.py and convert.py stand-ins for dsa_quality: each keeps its arguments and OMP_NUM_THREADS (as NAME.json
# beside itself); the two dense runs wait for each other to start (side by side, not in turn: one alone waits in
# vain); a resumed (sparse) run writes the indexer's KL rows
QUALITY_TRAIN = """import json, os, sys, time
args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--'))
here, name = os.path.dirname(__file__), os.path.basename(args['out_dir'])
open(os.path.join(here, name + '.started'), 'w').close()
other = {'dense': 'dsa-dense', 'dsa-dense': 'dense'}.get(name)
deadline = time.time() + 60
while other and not os.path.exists(os.path.join(here, other + '.started')) and time.time() < deadline:
    time.sleep(0.1)
saw_other = bool(other) and os.path.exists(os.path.join(here, other + '.started'))
with open(os.path.join(here, name + '.json'), 'w') as f:
    json.dump(dict(argv=sys.argv[1:], threads=os.environ.get('OMP_NUM_THREADS'), saw_other=saw_other), f)
sparse = 'resume' in args
os.makedirs(args['out_dir'], exist_ok=True)
with open(os.path.join(args['out_dir'], 'metrics.jsonl'), 'w') as f:
    for row in [dict(iter=10, loss=2.0, indexer=0.9), dict(iter=WARMUP, loss=1.9, indexer=0.5),
                dict(iter=40, val_loss=1.7, val_indexer=0.4), dict(iter=50, loss=1.8, indexer=0.3)] if sparse else [
                dict(iter=10, loss=2.0), dict(iter=20, val_loss=1.6 if args['max_time'] == '4' else 1.9)]:
        f.write(json.dumps(row) + '\\n')
"""
QUALITY_CONVERT = """import json, os, sys
with open(os.path.join(os.path.dirname(__file__), 'convert.json'), 'w') as f:
    json.dump(dict(argv=sys.argv[1:], threads=os.environ.get('OMP_NUM_THREADS')), f)
"""


def test_dsa_quality_trains_dense_and_the_v32_route_side_by_side_on_one_thread_each(tmp_path, monkeypatch):
    warmup = bench.DSA_QUALITY["index_warmup"]
    (tmp_path / "train.py").write_text(QUALITY_TRAIN.replace("WARMUP", str(warmup)))
    (tmp_path / "convert.py").write_text(QUALITY_CONVERT)
    monkeypatch.setattr(bench, "TRAIN", str(tmp_path / "train.py"))
    monkeypatch.setattr(bench, "CONVERT", str(tmp_path / "convert.py"))
    dataset(tmp_path / "data", "shakespeare_char", 65, source="input.txt")
    bench.main(["--only=dsa_quality", "--dsa_time=4", "--dtype=float32", f"--data_dir={tmp_path / 'data'}",
                f"--out={tmp_path / 'bench.json'}"])
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("dense", "dsa-dense", "convert", "dsa")}
    assert {run["threads"] for run in runs.values()} == {"1"}
    dense, first, sparse = runs["dense"], runs["dsa-dense"], runs["dsa"]
    assert dense["saw_other"] and first["saw_other"]  # side by side
    assert {"config/shakespeare_char_dsa.py", "--index_topk=0", "--max_time=4"} <= set(dense["argv"])
    assert {"config/shakespeare_char_dsa.py", "--index_topk=0", "--max_time=2"} <= set(first["argv"])
    assert runs["convert"]["argv"][0] == "add-indexers" and "--index_topk=128" in runs["convert"]["argv"]
    assert f"--index_warmup={warmup}" in runs["convert"]["argv"]
    assert any(a.startswith("--resume=") and a.endswith("dsa") for a in sparse["argv"])
    assert 1 <= int(next(a for a in sparse["argv"] if a.startswith("--max_time="))[11:]) <= 4  # what the clock left
    _, rows = figures(tmp_path)
    how = "4 s each, side by side, 1 thread each, float32"
    assert rows[f"dense MLA: val loss at the end ({how})"]["value"] == 1.6
    assert rows[f"DSA after warm-up: val loss at the end ({how})"]["value"] == 1.7
    kl = rows[f"indexer KL (train) at iterations 10, {warmup}, 50"]
    assert kl["value"] == "0.900 / 0.500 / 0.300" and kl["val_series"] == [[40, 0.4]]
