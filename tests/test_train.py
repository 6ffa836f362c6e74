"""train.py and configurator.py: what a user relies on, on a tiny MoE model and a tiny char dataset."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import model
import prepare
import train
from checkpoint import draft_vocabulary
from configurator import configure
from conftest import TINY, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def run(data, out_dir, *args):
    """train.py in this process with the tiny model; returns the metrics.jsonl rows."""
    train.train(*configure(train.DEFAULTS, [*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={out_dir}', *args]))
    return rows(out_dir)


def error_of(capsys, fn):
    """The one line fn prints on stderr as it exits with status 2."""
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1, err
    return err


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """One end-to-end run whose outputs several tests read."""
    out = str(tmp_path_factory.mktemp('run'))
    run(data, out, '--max_iters=40', '--eval_interval=20', '--sample_interval=20', '--sample_tokens=8', '--sample_prompt=the ',
        '--capacity_factor=1.25', '--mtp_depth=1')
    return out


def test_a_run_of_no_steps_ends_without_a_traceback(data, tmp_path):
    out = tmp_path / 'out'
    train.train(*configure(train.DEFAULTS, [*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={out}',
                                            '--max_iters=0']))
    assert not (out / 'metrics.jsonl').exists()  # nothing logged: no curves to plot


def test_configurator_errors_are_one_line_with_exit_2(capsys, tmp_path):
    assert 'did you mean --learning_rate' in error_of(capsys, lambda: configure(train.DEFAULTS, ['--lerning_rate=1e-3']))
    assert 'must be int' in error_of(capsys, lambda: configure(train.DEFAULTS, ['--max_iters=lots']))
    assert 'not found' in error_of(capsys, lambda: configure(train.DEFAULTS, ['config/nonexistent.py']))
    assert 'needs a value' in error_of(capsys, lambda: configure(train.DEFAULTS, ['--max_iters']))
    flags = configure(train.DEFAULTS, ['--compile', '--max_iters', '7'])[0]  # a bare flag, and --key value
    assert (flags['compile'], flags['max_iters']) == (True, 7)
    bad = tmp_path / 'bad.py'
    bad.write_text('n_layers = 4\n')
    assert 'did you mean --n_layer' in error_of(capsys, lambda: configure(train.DEFAULTS, [str(bad)]))
    # config file, then overrides; ints become floats where a float is expected; _helpers are allowed
    good = tmp_path / 'good.py'
    good.write_text('_w = 2\nn_layer = 3 * _w\nlearning_rate = 1\nmoe_layers = [1, 3]\n')
    config, explicit = configure(train.DEFAULTS, [str(good), '--n_layer=2', '--dataset=42'])
    assert (config['n_layer'], config['learning_rate'], config['moe_layers'], config['dataset']) == (2, 1.0, [1, 3], '42')
    assert explicit == {'n_layer': '--n_layer=2', 'learning_rate': str(good), 'moe_layers': str(good), 'dataset': '--dataset=42'}
    # end to end: no traceback from the real script
    p = subprocess.run([sys.executable, 'train.py', '--batch_size=2.5'], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith('error: batch_size must be int') and 'Traceback' not in p.stderr


def test_every_number_and_choice_has_a_rule():
    numbers = {k for k, v in train.DEFAULTS.items() if type(v) in (int, float)}
    assert numbers | {'dtype', 'lr_schedule', 'attn', 'score_func', 'layer_types'} == set(train.RULES)


# (key, args): each value is refused in one line naming the key, before any work; TINY has 2 layers, 2 heads, 4 experts
BAD = [('dropout', '--dropout=1.0'), ('beta1', '--beta1=1.0'), ('beta2', '--beta2=-0.1'),
       ('learning_rate', '--learning_rate=-1e-3'), ('max_iters', '--max_iters=-1'), ('max_time', '--max_time=-5'),
       ('nan_patience', '--nan_patience=0'), ('seed', '--seed=-1'), ('seed', f'--seed={2 ** 63}'), ('n_head', '--n_head=0'),
       ('qk_rope_head_dim', '--qk_rope_head_dim=7'), ('capacity_factor', '--capacity_factor=-1'),
       ('mtp_depth', '--mtp_depth=-1'), ('top_k', '--top_k=-1'), ('temperature', '--temperature=-0.5'),
       ('dtype', '--dtype=fp8'), ('lr_schedule', '--lr_schedule=linear'), ('batch_size', '--batch_size=0'),
       ('eval_interval', '--eval_interval=0'), ('norm_eps', '--norm_eps=0'),
       # several keys at once: check_config
       ('kv_lora_rank', '--kv_lora_rank=0'), ('n_activated_experts', '--n_activated_experts=5'),
       ('moe_layers', '--moe_layers=[1, 2]'), ('n_kv_head', '--n_kv_head=3'), ('n_embd', '--attn=gqa', '--n_embd=34'),
       ('n_expert_groups', '--n_expert_groups=3'), ('n_limited_groups', '--n_limited_groups=2')]


@pytest.mark.parametrize('key, args', [(key, args) for key, *args in BAD], ids=[' '.join(b[1:]) for b in BAD])
def test_a_bad_value_is_one_error_line_naming_the_key_before_any_work(data, tmp_path, capsys, key, args):
    out = tmp_path / 'out'
    err = error_of(capsys, lambda: train.train(*configure(
        train.DEFAULTS, [*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={out}', *args], rules=train.RULES)))
    assert err.startswith(f'error: {key}=') and 'is not allowed' in err
    assert capsys.readouterr().out == '' and not out.exists()


def test_train_py_checks_the_rules_on_its_command_line_and_after_merging_a_resumed_config(data, trained, tmp_path,
                                                                                          capsys):
    p = subprocess.run([sys.executable, 'train.py', '--dropout=1.0'], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr == 'error: dropout=1.0 is not allowed: dropout must be in [0, 1)\n'
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    ckpt['config']['beta2'] = 1.5  # a checkpoint from before the rules
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    err = error_of(capsys, lambda: run(data, tmp_path, f'--resume={tmp_path / "ckpt.pt"}'))
    assert err.startswith('error: beta2=1.5 is not allowed')


def test_statistics_are_all_reduced_in_one_call_and_come_back_by_name():
    class Doubling(train.World):
        calls = 0

        def all_reduce(self, t):
            self.calls += 1
            return t.mul_(2)
    world = Doubling()
    stats = dict(loss=torch.tensor(1.5), ce=torch.tensor(1.0), stop=torch.tensor(0.0),
                 loads=torch.arange(6.0).view(2, 3), dropped=torch.tensor([1.0, 2.0]), dense=torch.zeros(0, 0))
    got = train.all_reduce_by_name(world, stats)
    assert world.calls == 1 and list(got) == list(stats)
    assert all(torch.equal(got[k], 2 * v) for k, v in stats.items())


def test_lr_schedules_warm_up_then_decay_to_min_lr():
    c = train.SimpleNamespace(**{**train.DEFAULTS, 'learning_rate': 1.0, 'min_lr': 0.1, 'warmup_iters': 10,
                                 'max_iters': 110, 'lr_decay_iters': 0})
    lrs = [train.get_lr(c, it) for it in range(120)]
    assert lrs[0] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    c.lr_schedule, c.wsd_decay_frac = 'wsd', 0.2  # stable until 88, then linear to min_lr at 110
    lrs = [train.get_lr(c, it) for it in range(120)]
    assert lrs[10] == lrs[88] == 1.0 and lrs[99] == pytest.approx(0.55) and lrs[110] == 0.1


def test_tiny_run_learns_and_writes_metrics_checkpoints_samples_and_curves(trained):
    r = rows(trained)
    assert [x['iter'] for x in r] == list(range(1, 41))
    evals = [x for x in r if 'val_loss' in x]
    assert [x['iter'] for x in evals] == [20, 40]
    assert r[-1]['loss'] < r[0]['loss'] - 0.5 and evals[1]['val_loss'] < r[0]['loss'] - 0.5
    assert evals[-1]['val_ppl'] == pytest.approx(math.exp(evals[-1]['val_loss']))
    for key in ('ce', 'aux', 'lr', 'grad_norm', 'ms', 'tok_s', 'mem_mb', 'eta_s', 'moe', 'expert_load'):
        assert key in r[-1], key
    assert r[-1]['mtp'] > 0 and r[-1]['loss'] > r[-1]['ce']  # the MTP term trains, and is left out of eval
    # the MTP module's guesses at eval: they improve (the tiny corpus is repetitive), so drafting would pay
    assert 0 <= evals[0]['val_mtp_acc'] < evals[1]['val_mtp_acc'] <= 1
    assert all(0 <= e['val_mtp_agree'] <= 1 for e in evals)  # test_model pins what it counts
    assert [m['layer'] for m in r[-1]['moe']] == [1, 2]  # layer 1 and the MTP module's block
    moe = r[-1]['moe'][0]
    assert moe['layer'] == 1 and moe['max'] >= 1 >= moe['min'] and 0 <= moe['drop'] < 1 and moe['cv'] >= 0
    assert all(isinstance(x['sample'], str) and len(x['sample']) > 8 for x in r if x['iter'] in (20, 40))
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    assert ckpt['iter_num'] == 40 and ckpt['best_val_loss'] == min(x['val_loss'] for x in evals)
    assert {'model_args', 'model', 'optimizer', 'scaler', 'config', 'tokens_seen', 'meta'} <= ckpt.keys()
    assert ckpt['model']['layers.1.ffn.gate.bias'].abs().sum() > 0  # the routing biases moved and were saved
    assert os.path.exists(os.path.join(trained, 'best.pt'))
    with open(os.path.join(trained, 'config.json')) as f:
        assert json.load(f)['capacity_factor'] == 1.25
    if importlib.util.find_spec('matplotlib'):
        assert os.path.getsize(os.path.join(trained, 'curves.png')) > 0


def test_a_checkpoint_counts_the_training_tokens_and_drafts_choose_among_the_most_frequent(data, trained):
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    tokens = np.fromfile(os.path.join(data, 'tiny', 'train.bin'), dtype=np.uint16)
    assert ckpt['token_counts'].tolist() == np.bincount(tokens, minlength=ckpt['model_args']['vocab_size']).tolist()
    counts = torch.zeros(40_000, dtype=torch.long)
    counts[[5, 17, 30_000, 39_999]] = torch.tensor([4, 9, 1, 2])
    assert draft_vocabulary(counts, tokens=3).tolist() == [5, 17, 39_999]  # the 3 most frequent, in id order
    assert draft_vocabulary(counts, tokens=8).tolist() == [5, 17, 30_000, 39_999]  # only tokens that occur
    assert draft_vocabulary(counts[:31], tokens=8) is None and draft_vocabulary(None) is None  # the whole head


def test_a_dense_gqa_model_trains_too(data, tmp_path):
    r = run(data, tmp_path, '--max_iters=10', '--eval_interval=10', '--n_routed_experts=0', '--attn=gqa',
            '--n_kv_head=1', '--sample_interval=10', '--sample_prompt=the ')
    assert r[-1]['val_loss'] < r[0]['loss'] and 'moe' not in r[-1] and r[-1]['sample'].startswith('the ')


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data, tmp_path):
    args = ['--eval_interval=3', '--lr_decay_iters=8', '--dropout=0.1', '--capacity_factor=1.25',
            '--gradient_accumulation_steps=2', '--seq_aux_alpha=0.01']
    straight = run(data, tmp_path / 'a', '--max_iters=8', *args)
    run(data, tmp_path / 'b', '--max_iters=4', *args)
    resumed = run(data, tmp_path / 'b', '--max_iters=8', '--resume=auto', *args)
    assert [x['loss'] for x in resumed] == [x['loss'] for x in straight]
    # the first leg's final eval at iter 4 is extra; the others agree
    assert {x['iter']: x['val_loss'] for x in straight if 'val_loss' in x}.items() <= \
        {x['iter']: x['val_loss'] for x in resumed if 'val_loss' in x}.items()


FORWARD = model.Transformer.forward


def model_clock(monkeypatch, seconds=lambda now: 0.01):
    """train.py's clock, made to advance only as the model runs: each forward pass (training or eval) takes
    seconds(now) of it, and nothing else takes any time. The same run times the same wherever it runs, and a
    machine that speeds up or slows down mid-run is a seconds() that changes. Returns [now]."""
    now = [0.0]

    def timed(self, *a, **kw):
        now[0] += seconds(now[0])
        return FORWARD(self, *a, **kw)
    monkeypatch.setattr(model.Transformer, 'forward', timed)
    monkeypatch.setattr(train, 'time', types.SimpleNamespace(time=lambda: now[0]))
    return now


def test_max_time_fits_max_iters_so_that_the_run_and_its_lr_decay_end_near_the_budget(data, tmp_path, capsys,
                                                                                      monkeypatch):
    clock = model_clock(monkeypatch)
    r = run(data, tmp_path, '--max_time=5', '--eval_interval=100')
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == ckpt['config']['max_iters'] == r[-1]['iter'] > train.Budget.PROBE
    assert f"max_iters={r[-1]['iter']}" in capsys.readouterr().out
    assert r[-1]['lr'] == pytest.approx(3e-4, rel=1e-3)  # min_lr: the decay ends with the run
    assert abs(clock[0] - 5) < 0.05 * 5  # within 5% of the budget, by the clock it read


@pytest.mark.parametrize('seconds', [lambda now: 0.01 if now < 2 else 0.03, lambda now: 0.03 if now < 2 else 0.01],
                         ids=['slows down', 'speeds up'])
def test_max_time_lands_on_a_machine_that_changes_speed_mid_run(data, tmp_path, monkeypatch, seconds):
    clock = model_clock(monkeypatch, seconds)
    r = run(data, tmp_path, '--max_time=6', '--eval_interval=50')
    assert abs(clock[0] - 6) < 0.05 * 6  # within 5% of the budget
    # the learning rate decays to where the run ended, not to where the first seconds foretold
    assert r[-1]['lr'] == pytest.approx(3e-4, rel=1e-3) and r[-1]['iter'] > 2 * train.Budget.PROBE


def test_max_time_counts_the_samples_it_prints_and_the_last_one(data, tmp_path, monkeypatch):
    # a sample of 40 tokens is 40 forward passes, as long as 40 steps: the one at the end must be in the budget
    clock = model_clock(monkeypatch)
    r = run(data, tmp_path, '--max_time=6', '--eval_interval=100', '--sample_interval=1000', '--sample_tokens=40',
            '--sample_prompt=the ')
    assert abs(clock[0] - 6) < 0.05 * 6 and 'sample' in r[-1]


def test_max_time_fits_a_run_that_evaluates_every_step(data, tmp_path, monkeypatch):
    # eval_interval=1 makes the eval part of a step: the probe must still time the samples and let the fit start
    clock = model_clock(monkeypatch)
    run(data, tmp_path, '--max_time=3', '--eval_interval=1', '--eval_iters=1')
    assert abs(clock[0] - 3) < 0.05 * 3


def test_an_explicit_max_iters_turns_max_time_off(data, tmp_path):
    r = run(data, tmp_path, '--max_time=5', '--max_iters=70', '--eval_interval=100')
    assert r[-1]['iter'] == 70 and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['config']['max_time'] == 0


def test_max_time_on_the_command_line_wins_over_max_iters_from_a_config_file_and_says_so(data, tmp_path, monkeypatch,
                                                                                         capsys):
    (tmp_path / 'config.py').write_text('max_iters = 500\nmax_time = 0\n')
    model_clock(monkeypatch)
    r = run(data, tmp_path / 'a', str(tmp_path / 'config.py'), '--max_time=2', '--eval_interval=100')
    out = capsys.readouterr().out
    assert f"max_time=2 (--max_time=2) wins over max_iters=500 ({tmp_path / 'config.py'})" in out
    assert 100 < r[-1]['iter'] < 500
    (tmp_path / 'config.py').write_text('max_time = 2\n')  # and the other way round
    r = run(data, tmp_path / 'b', str(tmp_path / 'config.py'), '--max_iters=20', '--eval_interval=100')
    assert "max_iters=20 (--max_iters=20) turns max_time=2" in capsys.readouterr().out and r[-1]['iter'] == 20


def test_a_max_time_run_resumes_with_the_max_iters_it_fixed_and_the_same_losses(data, tmp_path, monkeypatch):
    args = ['--max_time=5', '--eval_interval=20', '--dropout=0.1']
    clock = model_clock(monkeypatch)
    straight = run(data, tmp_path / 'a', *args)
    assert abs(clock[0] - 5) < 0.2  # it ended at its budget, by the clock it read
    model_clock(monkeypatch)
    forward, calls = model.Transformer.forward, [0]

    def interrupted(self, *a, **kw):  # a Ctrl-C in iteration 75, after max_iters is fitted from iteration 10 on
        calls[0] += self.training
        if calls[0] == 75 and self.training:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *a, **kw)
    monkeypatch.setattr(model.Transformer, 'forward', interrupted)
    run(data, tmp_path / 'b', *args)
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['iter_num'] == 75
    model_clock(monkeypatch)
    resumed = run(data, tmp_path / 'b', *args, '--resume=auto')  # its clock now reads differently
    assert [x['loss'] for x in resumed] == [x['loss'] for x in straight] and len(straight) > 75
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['config']['max_iters'] == straight[-1]['iter']


def test_evaluation_reports_bits_per_byte_where_meta_json_counts_bytes(trained, tmp_path):
    words = ('café ', 'naïve ', 'über ', 'to be ', 'thou art ')
    text = ''.join(words[i] for i in np.random.default_rng(0).integers(0, len(words), 3000))
    (tmp_path / 'corpus.txt').write_text(text, encoding='utf-8')
    meta = prepare.main(['text', f'--input={tmp_path / "corpus.txt"}', '--name=bytes', '--tokenizer=char',
                         f'--data_dir={tmp_path}'])
    n = int(len(text) * 0.9)
    assert (meta['train_bytes'], meta['val_bytes']) == (len(text[:n].encode()), len(text[n:].encode()))
    train.train(*configure(train.DEFAULTS, [*TINY, f'--data_dir={tmp_path}', '--dataset=bytes',
                                            f'--out_dir={tmp_path / "out"}', '--max_iters=2', '--eval_interval=2']))
    row = rows(tmp_path / 'out')[-1]
    for split in ('train', 'val'):
        per_token = meta[f'{split}_bytes'] / meta[f'{split}_tokens']
        assert per_token > 1.05  # the accents take two bytes
        assert row[f'{split}_bpb'] == pytest.approx(row[f'{split}_loss'] / math.log(2) / per_token)
    assert not any('val_bpb' in x for x in rows(trained))  # a meta.json without byte counts: no bits per byte


def test_resume_auto_starts_fresh_without_a_checkpoint_and_reads_an_out_dir(data, tmp_path, capsys):
    run(data, tmp_path, '--max_iters=2', '--resume=auto', '--eval_interval=100')
    assert 'starting at iter 0' in capsys.readouterr().out
    # resuming by out_dir alone takes the run's own config from the checkpoint
    train.train(*configure(train.DEFAULTS, [f'--resume={tmp_path}', '--max_iters=3']))
    assert 'resuming' in capsys.readouterr().out and [x['iter'] for x in rows(tmp_path)] == [1, 2, 3]


def test_a_checkpoint_from_a_compiled_model_resumes(data, trained, tmp_path):
    ckpt = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    compiled_keys = torch.compile(model.Transformer(model.ModelConfig(**ckpt['model_args']))).state_dict().keys()
    ckpt['model'] = dict(zip(compiled_keys, ckpt['model'].values()))  # what saving a compiled model gives
    assert next(iter(ckpt['model'])).startswith('_orig_mod.')
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    r = run(data, tmp_path, f'--resume={tmp_path / "ckpt.pt"}', '--max_iters=42')
    assert [x['iter'] for x in r] == [41, 42] and r[-1]['loss'] < rows(trained)[0]['loss'] - 0.5  # trained weights


def test_bad_checkpoints_fail_with_one_clear_line(data, trained, tmp_path, capsys):
    good = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    (tmp_path / 'truncated.pt').write_bytes(good[:len(good) // 2])
    corrupt = bytearray(good)
    start = good.index(b'data.pkl') + 40
    corrupt[start:start + 64] = os.urandom(64)
    (tmp_path / 'corrupt.pt').write_bytes(bytes(corrupt))

    def resume(path, *args):
        return lambda: run(data, tmp_path / 'out', f'--resume={path}', *args)
    assert 'truncated' in error_of(capsys, resume(tmp_path / 'truncated.pt'))
    assert 'corrupt' in error_of(capsys, resume(tmp_path / 'corrupt.pt'))
    assert 'another vocabulary' in error_of(capsys, resume(trained, '--dataset=wide'))
    assert 'n_embd=32 (asked 48)' in error_of(capsys, resume(trained, '--n_embd=48'))
    assert 'no checkpoint at' in error_of(capsys, resume(tmp_path / 'missing.pt'))
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(data, tmp_path):
    # the second save (at iter 4) writes half a file, then the process is killed hard
    script = f"""
import os, runpy, signal, sys, torch
sys.argv = ['train.py', *{[*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path}',
                           '--max_iters=6', '--eval_interval=2']!r}]
saves, save = [], torch.save
def dying_save(obj, f):
    saves.append(1)
    if len(saves) == 2:
        f.write(b'PK half a checkpoint'); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, f)
torch.save = dying_save
runpy.run_path('train.py', run_name='__main__')
"""
    p = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 2
    r = run(data, tmp_path, '--max_iters=6', '--eval_interval=2', '--resume=auto')
    assert r[-1]['iter'] == 6


def test_sigint_finishes_the_step_saves_and_exits_0(data, tmp_path):
    cmd = [sys.executable, 'train.py', *TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path}',
           '--max_iters=100000', '--eval_interval=100000']
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / 'metrics.jsonl'
    deadline = time.time() + 60
    while not (metrics.exists() and metrics.read_text().count('\n') >= 3) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert 'SIGINT' in out and 'Traceback' not in err
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == rows(tmp_path)[-1]['iter'] >= 3


def plant_nans(monkeypatch, bad_iters, factor=float('nan')):
    """Make the training forward of the given iterations (1-based) return its loss times factor (NaN)."""
    forward, calls = model.Transformer.forward, [0]

    def nan_forward(self, idx, targets=None, start_pos=None):
        out = forward(self, idx, targets, start_pos)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_iters:
                out = out._replace(loss=out.loss * factor)
        return out
    monkeypatch.setattr(model.Transformer, 'forward', nan_forward)


def test_a_nan_step_is_skipped_and_training_goes_on(data, tmp_path, monkeypatch):
    plant_nans(monkeypatch, {3})
    r = run(data, tmp_path, '--max_iters=8', '--eval_interval=4')
    assert r[2]['iter'] == 3 and r[2]['skipped'] and r[2]['loss'] is None
    assert not any(x['skipped'] for x in r if x['iter'] != 3) and r[-1]['loss'] < r[0]['loss']
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.isfinite(v).all() for v in state.values())


def test_repeated_nans_go_back_to_the_checkpoint_at_half_the_lr_then_stop(data, tmp_path, monkeypatch, capsys):
    plant_nans(monkeypatch, {5, 6, 7})  # iterations 5-7; ckpt.pt holds iteration 4
    r = run(data, tmp_path, '--max_iters=8', '--eval_interval=4', '--decay_lr=False')
    assert 'went back to' in capsys.readouterr().out
    assert [x['iter'] for x in r] == list(range(1, 9)) and r[-1]['lr'] == pytest.approx(1.5e-3)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['lr_scale'] == 0.5
    plant_nans(monkeypatch, set(range(1, 100)))  # NaN for good: going back does not help, so stop
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, '--max_iters=20', '--eval_interval=4', '--resume=auto')
    assert 'stopping' in str(e.value.code) and 'learning_rate' in str(e.value.code)


def test_float16_skips_an_overflowing_step_through_the_grad_scaler_and_resumes_exactly(data, tmp_path, monkeypatch):
    # the CUDA fp16 path, on CPU: a loss x 1e30 is finite in float32, but its scaled gradients overflow float16,
    # so the scaler must skip that step and halve its scale, and the checkpoint must carry the scale on
    args = ['--dtype=float16', '--eval_interval=4', '--lr_decay_iters=8']
    plant_nans(monkeypatch, {3}, factor=1e30)
    straight = run(data, tmp_path / 'a', '--max_iters=8', *args)
    scale = lambda run_dir: torch.load(tmp_path / run_dir / 'ckpt.pt', weights_only=True)['scaler']['scale']
    plant_nans(monkeypatch, {3}, factor=1e30)
    run(data, tmp_path / 'b', '--max_iters=4', *args)
    assert scale('b') == 2.0 ** 15
    resumed = run(data, tmp_path / 'b', '--max_iters=8', '--resume=auto', *args)
    assert [x['loss'] for x in resumed] == [x['loss'] for x in straight]
    assert scale('a') == scale('b') == 2.0 ** 15  # powers of two scale exactly: only the state shows a lost scale
    assert straight[2]['loss'] > 1e29 and straight[-1]['loss'] < straight[0]['loss']


def test_wandb_and_tensorboard_get_every_logged_row_and_are_closed(data, tmp_path, monkeypatch):
    """With local stand-ins for wandb and torch.utils.tensorboard: what train.py hands them."""
    calls = []
    wandb = types.ModuleType('wandb')
    wandb.init = lambda **kw: calls.append(('init', kw))
    wandb.log = lambda metrics, step: calls.append(('log', step, metrics))
    wandb.finish = lambda: calls.append(('finish',))

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(('tb', log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(('scalar', step, tag, value))

        def close(self):
            calls.append(('close',))
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', types.SimpleNamespace(SummaryWriter=SummaryWriter))
    got = run(data, tmp_path, '--max_iters=4', '--eval_interval=2', '--wandb_log=True', '--wandb_project=p',
              '--wandb_run_name=r', '--tensorboard_log=True')
    assert calls[0][0] == 'init' and calls[0][1]['project'] == 'p' and calls[0][1]['name'] == 'r'
    assert calls[0][1]['config']['max_iters'] == 4 and calls[1] == ('tb', str(tmp_path / 'tb'))
    logged = [(step, m) for kind, step, m, *_ in [c for c in calls if c[0] == 'log']]
    assert [step for step, _ in logged] == [r['iter'] for r in got]
    assert all(m['loss'] == r['loss'] for (_, m), r in zip(logged, got))
    assert [m['val_loss'] for _, m in logged if 'val_loss' in m] == [r['val_loss'] for r in got if 'val_loss' in r]
    scalars = {(step, tag): value for kind, step, tag, value in [c for c in calls if c[0] == 'scalar']}
    assert all(scalars[r['iter'], 'loss'] == r['loss'] for r in got)
    assert sorted(c for c in calls[-2:]) == [('close',), ('finish',)]


def test_a_missing_tracker_package_is_one_clear_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
    assert 'pip install wandb' in error_of(capsys, lambda: run(data, tmp_path, '--max_iters=1', '--wandb_log=True'))
