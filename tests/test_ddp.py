"""train_ddp.py on CPU: 2 processes under torchrun with gloo, against train.py's loop."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from configurator import configure
from conftest import TINY, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py
# 8 iterations of 4 micro-batches in all: 2 per rank and 2 micro-steps each, so no_sync is exercised
RUN = [*TINY, '--dataset=tiny', '--gradient_accumulation_steps=4', '--eval_interval=4', '--lr_decay_iters=8',
       '--dropout=0.1', '--capacity_factor=1.25', '--seq_aux_alpha=0.01']
# runs train_ddp.py; at the end each rank saves its parameters and buffers (routing biases) for comparison
WORKER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import model, train, train_ddp
models = []
class Recorded(model.Transformer):
    def __init__(self, cfg):
        super().__init__(cfg)
        models.append(self)
train.Transformer = Recorded
if os.environ.get('FAIL_AT_STEP') and os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':
    step = model.Transformer.forward
    calls = []
    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ['FAIL_AT_STEP']):
            raise RuntimeError('planted failure')
        return step(self, *args, **kwargs)
    model.Transformer.forward = failing_step
if os.environ.get('FAST_CLOCK_RANK') == os.environ['RANK']:  # this rank's clock for train.py runs 3x fast
    import time, types
    start = time.time()
    train.time = types.SimpleNamespace(time=lambda: start + 3 * (time.time() - start))
train_ddp.process_start = lambda: train.time.time()  # the budget counts from here: imports take long on a busy machine
run = train_ddp.train
def train_then_save(*args):  # before train_ddp.py's closing barrier, which lets gloo finish these gathers
    result = run(*args)
    state = {{k: v.full_tensor() if hasattr(v, 'full_tensor') else v for k, v in models[0].state_dict().items()}}
    torch.save(state, os.path.join(sys.argv[-1].split('=', 1)[1], f"rank{{os.environ['RANK']}}.pt"))
    return result
train_ddp.train = train_then_save
train_ddp.main(sys.argv[1:])
"""


def torchrun(tmp_path, data, out_dir, *args, launcher=(), env=None):
    """train_ddp.py with 2 gloo processes; returns the metrics rows and the two ranks' final states."""
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER.format(root=ROOT))
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        *launcher, str(worker), *RUN, f'--data_dir={data}', *args, f'--out_dir={out_dir}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    states = [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=True) for r in (0, 1)]
    return rows(out_dir), states, p.stdout + p.stderr


def single(data, out_dir, *args):
    train.train(*configure(train.DEFAULTS, [*RUN, f'--data_dir={data}', f'--out_dir={out_dir}', *args]))
    return rows(out_dir)


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """8 iterations of train.py in one process."""
    return single(data, tmp_path_factory.mktemp('ref'), '--max_iters=8')


def assert_same_curve(got, want):
    assert [r['iter'] for r in got] == [r['iter'] for r in want]
    assert [r['loss'] for r in got] == pytest.approx([r['loss'] for r in want], abs=1e-5)
    evals = [r for r in got if 'val_loss' in r]
    assert evals and [r['val_loss'] for r in evals] == pytest.approx(
        [next(w['val_loss'] for w in want if w['iter'] == r['iter']) for r in evals], abs=1e-5)


def test_ddp_matches_train_py_and_both_ranks_hold_identical_weights_and_biases(data, reference, tmp_path):
    got, (rank0, rank1), _ = torchrun(tmp_path, data, tmp_path / 'ddp', '--max_iters=8')
    assert_same_curve(got, reference)
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert rank0['layers.1.ffn.gate.bias'].abs().sum() > 0  # the biases moved, the same way on both ranks


def test_a_ddp_checkpoint_resumes_in_train_py_and_the_other_way_round(data, reference, tmp_path):
    torchrun(tmp_path, data, tmp_path / 'a', '--max_iters=4')
    assert_same_curve(single(data, tmp_path / 'a', '--max_iters=8', '--resume=auto'), reference)
    single(data, tmp_path / 'b', '--max_iters=4')
    got, _, _ = torchrun(tmp_path, data, tmp_path / 'b', '--max_iters=8', '--resume=auto')
    assert_same_curve(got, reference)


def test_fsdp_trains_and_its_checkpoint_loads_in_train_py_and_sample_py(data, reference, tmp_path):
    out = tmp_path / 'fsdp'
    # its sample at the end runs the decoding path on sharded parameters (kept weight copies must not be shards)
    got, (rank0, rank1), log = torchrun(tmp_path, data, out, '--max_iters=4', '--fsdp=True', '--sample_interval=4',
                                        '--sample_prompt=the ')
    assert_same_curve(got, reference[:4])
    assert '---- sample at iter 4:' in log
    assert torch.equal(rank0['layers.1.ffn.gate.bias'], rank1['layers.1.ffn.gate.bias'])
    assert_same_curve(single(data, out, '--max_iters=8', '--resume=auto'), reference)
    p = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5',
                        '--start=the '], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr


def test_a_failed_rank_stops_the_other_and_a_restart_resumes_from_the_checkpoint(data, reference, tmp_path):
    # rank 1 fails in its 11th forward (iteration 5, after the eval at 4); torchrun restarts both from ckpt.pt
    got, _, log = torchrun(tmp_path, data, tmp_path / 'r', '--max_iters=8', launcher=['--max-restarts=1'],
                           env={'FAIL_AT_STEP': '11'})
    assert 'planted failure' in log and 'resuming' in log and 'at iter 4' in log
    assert 'rank 0: stopping, another process failed' in log
    assert_same_curve(got, reference)


def test_under_max_time_rank_0_fixes_max_iters_for_every_rank(data, tmp_path):
    # rank 1 alone would fit about a third as many iterations, stop early and leave rank 0 waiting (ddp_timeout)
    got, (rank0, rank1), log = torchrun(tmp_path, data, tmp_path / 't', '--max_time=15', '--eval_interval=50',
                                        '--ddp_timeout=30', env={'FAST_CLOCK_RANK': '1'})
    fixed = torch.load(tmp_path / 't' / 'ckpt.pt', weights_only=True)['config']['max_iters']
    assert got[-1]['iter'] == fixed > 2 * train.Budget.PROBE and log.count(f'max_iters={fixed}') == 1, log[-3000:]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


class Rank(train.World):
    """Process rank of size, as train.train sees it (no process group: these tests stop before the loop)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_gradient_accumulation_left_unset_gives_each_process_at_least_one_micro_batch(data, tmp_path, capsys):
    base = [*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path}']
    (tmp_path / 'config.py').write_text('gradient_accumulation_steps = 4\n')  # written for 1, 2 or 4 processes
    for processes, args, steps in ((1, [], 1), (3, [], 3), (4, [], 4), (16, [], 16), (4, ['--gradient_accumulation_steps=8'], 8),
                                   (4, [str(tmp_path / 'config.py')], 4), (8, [str(tmp_path / 'config.py')], 8)):
        c = train.resolve_config(*configure(train.DEFAULTS, [*base, *args]), processes)[0]
        assert c.gradient_accumulation_steps == steps, (processes, args)
    assert capsys.readouterr().out.count('note: gradient_accumulation_steps=4') == 1  # the config's, rounded up for 8
    # set, it must divide: one error line, from rank 0 alone, and every rank exits 2 before any work
    for rank in (0, 1, 2):
        with pytest.raises(SystemExit) as e:
            train.train(*configure(train.DEFAULTS, [*base, '--gradient_accumulation_steps=4']), Rank(rank, 3))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count('\n') == (rank == 0), err
        assert rank or 'gradient_accumulation_steps=4 is not allowed' in err and 'multiple of the 3 processes' in err
    assert not os.path.exists(tmp_path / 'lock')


def test_without_torchrun_it_says_how_to_launch_and_exits_2():
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    p = subprocess.run([sys.executable, 'train_ddp.py', 'config/shakespeare_moe.py'], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and 'torchrun --standalone --nproc_per_node' in p.stderr and 'Traceback' not in p.stderr


# rank 1 sends itself a signal at points of a step named by AIM ("function:call:before|after:SIGNAL", comma-separated):
# one training per point, in out_dir/0, 1, ...; each rank writes how many steps (all-reduces) it ran
AIMED = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import model, train, train_ddp
rank, aim, calls = os.environ['RANK'], [], {{}}
def aimed(owner, name):
    real = getattr(owner, name)
    def call(*a, **kw):
        calls[name] = calls.get(name, 0) + 1
        hit = rank == '1' and aim[:2] == [name, calls[name]]
        if hit and aim[2] == 'before':
            os.kill(os.getpid(), getattr(signal, aim[3]))
        result = real(*a, **kw)
        if hit and aim[2] == 'after':
            os.kill(os.getpid(), getattr(signal, aim[3]))
        return result
    setattr(owner, name, call)
for owner, name in ((train, 'all_reduce_by_name'), (train, 'evaluate'), (train, 'full_state'), (model.Transformer, 'forward')):
    aimed(owner, name)
def each_point(config, explicit, world, started=None):
    for i, point in enumerate(os.environ['AIM'].split(',')):
        name, n, when, sig = point.split(':')
        aim[:], out = [name, int(n), when, sig], os.path.join(config['out_dir'], str(i))
        calls.clear()
        train.train({{**config, 'out_dir': out}}, explicit, world, started)
        with open(os.path.join(out, f'steps{{rank}}.json'), 'w') as f:
            json.dump(calls['all_reduce_by_name'], f)
train_ddp.train = each_point
train_ddp.main(sys.argv[1:])
"""


def launch(tmp_path, data, out_dir, aim, *args):
    """The two ranks of train_ddp.py started directly (no torchrun to stop the other when one fails): Popens."""
    worker = tmp_path / 'aimed.py'
    worker.write_text(AIMED.format(root=ROOT))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'AIM': aim, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
           'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2'}
    return [subprocess.Popen([sys.executable, str(worker), *RUN, f'--data_dir={data}', *args, f'--out_dir={out_dir}'],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}) for r in (0, 1)]


# (function, call, before or after it): mid-step, just after the all-reduce that carries the stop flag, during the
# eval at iteration 4, and during the save that follows it; and where both ranks must then stop
POINTS = [('forward:3:before', 2), ('all_reduce_by_name:2:after', 3), ('evaluate:1:before', 5),
          ('full_state:1:after', 5)]


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_saves(data, tmp_path):
    ranks = launch(tmp_path, data, tmp_path, ','.join(f'{p}:SIGTERM' for p, _ in POINTS), '--max_iters=8',
                   '--ddp_timeout=20')
    outs = [p.communicate(timeout=240) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    for i, (point, stop) in enumerate(POINTS):
        steps = [json.loads((tmp_path / str(i) / f'steps{r}.json').read_text()) for r in (0, 1)]
        assert steps == [stop, stop], point
        assert torch.load(tmp_path / str(i) / 'ckpt.pt', weights_only=True)['iter_num'] == stop, point


@pytest.mark.parametrize('sig', ['SIGSTOP', 'SIGKILL'])
def test_a_rank_stopped_or_killed_makes_the_other_exit_1_with_one_line_within_ddp_timeout(data, tmp_path, sig):
    rank0, rank1 = launch(tmp_path, data, tmp_path, f'forward:3:before:{sig}', '--max_iters=8', '--ddp_timeout=10')
    try:
        out, err = rank0.communicate(timeout=120)
    finally:
        rank1.kill()
        rank1.communicate()
    lines = err.strip().splitlines()
    assert rank0.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: rank 0: stopping'), err[-3000:]
