"""
SIGKILL train.py at random moments of training and saving, again and again, resuming each time with
--resume=auto: ckpt.pt must always load, and the run must end with the losses of an uninterrupted one
and its metrics.jsonl with the same rows: every eval's row there, none lost to a kill between a checkpoint
and its row.

    python tests/kill_resume.py              # 20 kills of a 400-iteration run
    python tests/kill_resume.py 50 --seed=1

tests/test_reliability.py runs a few kills of a shorter run in the regular suite.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY, make_dataset, rows  # noqa: E402 (after the path is set)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_py(data, out_dir, iters, log):
    """train.py on the tiny model in a process of its own, its output in the file log; an eval and a save every
    5 iterations, so that kills land in saves too."""
    return subprocess.Popen([sys.executable, 'train.py', *TINY, f'--data_dir={data}', '--dataset=tiny',
                             f'--out_dir={out_dir}', f'--max_iters={iters}', '--eval_interval=5', '--resume=auto'],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def trained_to(log_path):
    """The last iteration the log of train.py reports done, 0 before the first."""
    done = re.findall(r'^iter (\d+)/', open(log_path).read(), re.M)
    return int(done[-1]) if done else 0


def kill_and_resume(work, kills, iters, seed=0):
    """(kills made, the killed run's rows, an uninterrupted run's rows), each row (iter, loss, val_loss or None)
    from metrics.jsonl. Fails with AssertionError when a ckpt.pt does not load or a run fails.

    Each kill waits for a random iteration (the runs left spread over what remains, so that the last kill still
    finds the run training however fast the machine) and then a random few milliseconds, so that kills land in
    steps, evals and saves alike."""
    rand = random.Random(seed)
    make_dataset(os.path.join(work, 'data'), 'tiny')
    data, out, log_path = os.path.join(work, 'data'), os.path.join(work, 'killed'), os.path.join(work, 'log')
    ckpt, made = os.path.join(out, 'ckpt.pt'), 0
    while made < kills:
        start = torch.load(ckpt, weights_only=True)['iter_num'] if os.path.exists(ckpt) else 0
        target = start + rand.randint(1, max(1, (iters - start) // (kills - made + 1)))
        with open(log_path, 'w') as log:
            p = train_py(data, out, iters, log)
        while p.poll() is None and trained_to(log_path) < target:
            time.sleep(0.001)
        time.sleep(rand.uniform(0, 0.02))
        if p.poll() is not None:  # it finished before the kill
            assert p.returncode == 0, open(log_path).read()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        made += 1
        if os.path.exists(ckpt):  # none before the first save
            print(f"kill {made} after iter {target}: ckpt.pt loads, iter {torch.load(ckpt, weights_only=True)['iter_num']}",
                  flush=True)
    with open(log_path, 'w') as log:
        assert train_py(data, out, iters, log).wait() == 0, open(log_path).read()[-2000:]
        assert train_py(data, os.path.join(work, 'straight'), iters, log).wait() == 0, open(log_path).read()[-2000:]
    return made, *([(r['iter'], r['loss'], r.get('val_loss')) for r in rows(os.path.join(work, run))]
                   for run in ('killed', 'straight'))

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('kills', type=int, nargs='?', default=20)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--iters', type=int, default=400)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        made, killed, straight = kill_and_resume(work, a.kills, a.iters, a.seed)
    same = [r[:2] for r in killed] == [r[:2] for r in straight]
    evals = {r[0] for r in straight if r[2] is not None}
    missing = sorted(evals - {r[0] for r in killed if r[2] is not None})
    complete = not missing and killed == straight
    print(json.dumps(dict(kills=made, iters=a.iters, same_losses_as_uninterrupted=same, eval_rows=len(evals),
                          metrics_rows_complete=complete, eval_rows_missing=missing)))
    sys.exit(0 if same and complete and made == a.kills else 1)
