"""bench.py runs end to end and writes a bench.json that others can read. No timing is asserted:
bench.py measures, tests only check that it works."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), f"--out={tmp_path / 'bench.json'}", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_a_quick_section_writes_bench_json_with_its_figures_and_the_machine(tmp_path):
    r = bench(tmp_path, "--quick", "--only=prepare", "--corpus_mb=2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "bench.json").read_text())
    assert {"command", "machine", "torch", "date"} <= out["info"].keys()
    rows = {row["name"]: row for row in out["results"]}
    assert all(row["section"] == "prepare" for row in rows.values())
    speed = rows["synthetic 2 MB (hf jsonl, streamed): tokens/s"]
    assert speed["tokens"] > 100_000 and speed["value"] > 0  # 2 MB of English-like words, a few hundred thousand tokens
    peaks = [rows[f"synthetic {mb} MB: peak memory"]["value"] for mb in (1, 2)]
    assert all(math.isfinite(p) and 10 < p < 10_000 for p in peaks)  # MiB of the prepare.py process itself
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary name, then renamed


def test_a_bad_option_is_one_line_and_exit_status_2(tmp_path):
    for args in (["--nope=1"], ["--only=moe,nope"], ["--reps=many"]):
        r = bench(tmp_path, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "bench.json").exists()
