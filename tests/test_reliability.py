"""train.py against bad data and out_dirs, runs that would be lost or mixed, full disks, interrupts and kills."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import TINY, rows
from kill_resume import kill_and_resume
from test_train import ROOT, error_of, plant_nans, run

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def edit(path, text=None, data=None):
    """Replace a file's contents, or the file by a folder where text and data are both None."""
    os.remove(path)
    if text is None and data is None:
        os.mkdir(path)
    elif text is not None:
        open(path, 'w').write(text)
    else:
        open(path, 'wb').write(data)


def record_max_id(d, top):
    """meta.json as prepare.py now writes it: the token counts and the largest id of each split, here top."""
    meta = json.load(open(d / 'meta.json'))
    for split in ('train', 'val'):
        meta.update({f'{split}_tokens': os.path.getsize(d / f'{split}.bin') // 2, f'{split}_max_id': top})
    edit(d / 'meta.json', json.dumps(meta))


# (what is wrong, how to make it from a good dataset in folder d, what the one line says)
BAD_DATA = [
    ('train.bin of odd length', lambda d: open(d / 'train.bin', 'ab').write(b'x'), 'odd number of bytes'),
    ('train.bin a folder', lambda d: edit(d / 'train.bin'), 'no file train.bin'),
    ('a token id past the vocabulary', lambda d: edit(d / 'val.bin', data=bytes(100) + b'\xff\x00' + bytes(100)),
     "val.bin of tiny holds token id 255, but the model's vocabulary has 17 tokens"),
    ('meta.json garbled', lambda d: edit(d / 'meta.json', '{"vocab'), 'is not one prepare.py wrote'),
    ('meta.json a list', lambda d: edit(d / 'meta.json', '[16]'), 'is not one prepare.py wrote'),
    ('meta.json without vocab_size', lambda d: edit(d / 'meta.json', '{"tokenizer": "char"}'), 'is not one prepare.py'),
    ('meta.json vocab_size too small', lambda d: edit(d / 'meta.json', '{"tokenizer": "char", "vocab_size": 5}'),
     "train.bin of tiny holds token id 16, but the model's vocabulary has 5 tokens (meta.json)"),
    # the recorded largest id is trusted while the file has the length prepare.py wrote, and not after
    ('meta.json records an id past the vocabulary', lambda d: record_max_id(d, 40),
     "train.bin of tiny holds token id 40, but the model's vocabulary has 17 tokens"),
    ('train.bin replaced after meta.json', lambda d: (record_max_id(d, 3), open(d / 'train.bin', 'ab').write(b'\xff\x00')),
     "train.bin of tiny holds token id 255, but the model's vocabulary has 17 tokens"),
    # the same length and a recorded largest id that is a lie: the batch that reads the bad ids names the file
    ('train.bin changed in place after meta.json', lambda d: (record_max_id(d, 16), corrupt_in_place(d / 'train.bin')),
     "train.bin is corrupt: it holds token id 255, past the model's 17-token vocabulary")]


def corrupt_in_place(path):
    """Every 8th token of a .bin becomes id 255, its length unchanged: every training window holds one."""
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[::8] = 255
    tokens.tofile(path)


@pytest.mark.parametrize('make, says', [b[1:] for b in BAD_DATA], ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_one_line_when_the_dataset_is_opened_or_read(data, tmp_path, capsys, make, says):
    shutil.copytree(os.path.join(data, 'tiny'), tmp_path / 'data' / 'tiny')
    make(tmp_path / 'data' / 'tiny')
    err = error_of(capsys, lambda: run(tmp_path / 'data', tmp_path / 'out', '--max_iters=1'))
    assert says in err


@pytest.mark.parametrize('args, says', [(['--out_dir='], "out_dir='' cannot be used"),
                                        (['--out_dir=FILE'], 'cannot be used (File exists)'),
                                        (['--device=banana'], "device='banana' cannot be used")])
def test_an_unusable_out_dir_or_device_is_one_line(data, tmp_path, capsys, args, says):
    (tmp_path / 'FILE').write_text('not a folder')
    args = [a.replace('FILE', str(tmp_path / 'FILE')) for a in args]
    assert says in error_of(capsys, lambda: run(data, tmp_path / 'out', '--max_iters=1', *args))
    assert (tmp_path / 'FILE').read_text() == 'not a folder'


def test_a_trained_run_is_never_replaced_without_overwrite(data, tmp_path, capsys):
    run(data, tmp_path, '--max_iters=2', '--eval_interval=2')
    before = (tmp_path / 'ckpt.pt').read_bytes()
    assert 'holds a trained run (ckpt.pt, best.pt)' in error_of(capsys, lambda: run(data, tmp_path, '--max_iters=2'))
    os.remove(tmp_path / 'ckpt.pt')
    err = error_of(capsys, lambda: run(data, tmp_path, '--max_iters=2', '--resume=auto'))
    assert f'holds best.pt but no ckpt.pt: resume from it with --resume={tmp_path}/best.pt' in err
    assert (tmp_path / 'best.pt').read_bytes() == before and len(rows(tmp_path)) == 2
    run(data, tmp_path, '--max_iters=3', f'--resume={tmp_path}/best.pt')  # resuming its own best.pt is allowed
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 3
    r = run(data, tmp_path, '--max_iters=1', '--overwrite=True')
    assert 'removed ckpt.pt, best.pt' in capsys.readouterr().out and [x['iter'] for x in r] == [1]


def test_a_second_training_on_an_out_dir_refuses_and_a_dead_owners_lock_is_taken_over(data, tmp_path, capsys):
    os.makedirs(tmp_path / 'out')
    with open(tmp_path / 'out' / 'lock', 'w') as held:  # a training that is running: it holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write('pid 4242 on elsewhere\n')
        held.flush()
        err = error_of(capsys, lambda: run(data, tmp_path / 'out', '--max_iters=1'))
        assert 'is in use by another training (pid 4242 on elsewhere)' in err
    # the same lock file left by a training that was killed: nothing holds it any more
    assert [x['iter'] for x in run(data, tmp_path / 'out', '--max_iters=1')] == [1]
    assert 'taking it over' in capsys.readouterr().out and not (tmp_path / 'out' / 'lock').exists()


def test_resume_refuses_a_dataset_whose_character_table_differs_with_the_same_size(data, tmp_path, capsys):
    shutil.copytree(os.path.join(data, 'tiny'), tmp_path / 'data' / 'tiny')
    run(tmp_path / 'data', tmp_path / 'out', '--max_iters=1')
    meta = json.loads((tmp_path / 'data' / 'tiny' / 'meta.json').read_text())
    meta['chars'] = meta['chars'][::-1]  # the same characters and size, other ids
    (tmp_path / 'data' / 'tiny' / 'meta.json').write_text(json.dumps(meta))
    err = error_of(capsys, lambda: run(tmp_path / 'data', tmp_path / 'out', '--max_iters=2', '--resume=auto'))
    assert "is for another vocabulary: tokenizer 'char' #" in err


def test_a_metrics_line_cut_by_a_crash_does_not_stop_the_resume(data, tmp_path, capsys):
    run(data, tmp_path, '--max_iters=2', '--eval_interval=2')
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 3, "loss": 2.1')  # the crash came mid-line
    assert [x['iter'] for x in run(data, tmp_path, '--max_iters=3', '--resume=auto')] == [1, 2, 3]
    assert 'dropped the cut last line' in capsys.readouterr().out


def test_no_checkpoint_is_saved_while_steps_are_being_skipped(data, tmp_path, monkeypatch, capsys):
    # iterations 4-6 are non-finite: the eval at 4 must not save, so that going back (after 3) finds iteration 2
    plant_nans(monkeypatch, {4, 5, 6})
    r = run(data, tmp_path, '--max_iters=8', '--eval_interval=2', '--nan_patience=3')
    out = capsys.readouterr().out
    assert 'iter 4: not saving' in out and f'went back to {tmp_path}/ckpt.pt (iter 2)' in out
    assert [x['iter'] for x in r] == list(range(1, 9))


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_removes_the_partial_file(data, tmp_path, monkeypatch,
                                                                                         capsys):
    saves, save = [], torch.save

    def full_disk(obj, f):  # what torch.save raises when the disk fills under it
        saves.append(1)
        if len(saves) == 2:
            f.write(b'PK part of a checkpoint')
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
        save(obj, f)
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, '--max_iters=4', '--eval_interval=2')
    assert str(e.value.code).startswith(f'error: could not save {tmp_path}/ckpt.pt (') and '\n' not in e.value.code
    assert 'the partial file is removed' in e.value.code and not (tmp_path / 'ckpt.pt.tmp').exists()
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 2


# runs train.py after arming a Ctrl-C: in the first memmap (opening the dataset, before the loop), two in a step,
# or one in a step and the second inside the save it asks for (in torch.save's writer, which reports it as its error)
CTRL_C = """
import os, runpy, signal, sys, numpy, model, torch
sys.argv = ['train.py', *{args!r}]
def ctrl_c(*_, **__):
    os.kill(os.getpid(), signal.SIGINT)
forward, save, sent = model.Transformer.forward, torch.save, []
def once(self, *a, **kw):
    if not sent:
        sent.append(ctrl_c())
    return forward(self, *a, **kw)
class Interrupting:
    def __init__(self, f):
        self.f = f
    def write(self, b):
        ctrl_c()
        return self.f.write(b)
    def flush(self):
        self.f.flush()
def twice(self, *a, **kw):
    ctrl_c(), ctrl_c()
    return forward(self, *a, **kw)
if {where!r} == 'start-up':
    numpy.memmap = ctrl_c
elif {where!r} == 'a second Ctrl-C':
    model.Transformer.forward = twice
else:
    model.Transformer.forward = once
    torch.save = lambda obj, f: save(obj, Interrupting(f))
runpy.run_path('train.py', run_name='__main__')
"""


@pytest.mark.parametrize('where', ['start-up', 'a second Ctrl-C', 'a second Ctrl-C during the save'])
def test_ctrl_c_at_start_up_or_twice_is_one_line(data, tmp_path, where):
    args = [*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=5']
    p = subprocess.run([sys.executable, '-c', CTRL_C.format(args=args, where=where)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stderr) == (1, train.INTERRUPTED + '\n')
    assert not list(tmp_path.glob('*.pt*'))  # the save was abandoned whole: no checkpoint, no partial file


def test_a_kill_just_after_a_checkpoint_is_saved_leaves_its_eval_row_in_metrics(data, tmp_path):
    # SIGKILL as soon as the second checkpoint (iter 4) is in place: its eval row must be there already
    script = f"""
import os, runpy, signal, sys, checkpoint
sys.argv = ['train.py', *{[*TINY, f'--data_dir={data}', '--dataset=tiny', f'--out_dir={tmp_path}', '--max_iters=6',
                           '--eval_interval=2']!r}]
saves, save = [], checkpoint.save_checkpoint
def save_then_die(*a):
    save(*a)
    saves.append(1)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoint = save_then_die
runpy.run_path('train.py', run_name='__main__')
"""
    p = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 4
    assert [x['iter'] for x in rows(tmp_path) if 'val_loss' in x] == [2, 4]
    run(data, tmp_path, '--max_iters=6', '--eval_interval=2', '--resume=auto')
    assert [x['iter'] for x in rows(tmp_path) if 'val_loss' in x] == [2, 4, 6]
    assert [x['iter'] for x in rows(tmp_path)] == list(range(1, 7))


def test_random_kills_while_training_and_saving_resume_to_the_losses_and_metrics_of_an_uninterrupted_run(tmp_path):
    made, killed, straight = kill_and_resume(str(tmp_path), kills=3, iters=40)
    assert made == 3 and killed == straight  # tests/kill_resume.py: 20 kills and more
    # every eval of the uninterrupted run has its row after the kills, with the same losses
    assert [r for r in killed if r[2] is not None] == [r for r in straight if r[2] is not None] != []


# runs a script after arming a Ctrl-C for the moment its first slow import (torch; numpy for prepare.py) begins
CTRL_C_IN_IMPORT = """
import os, runpy, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name in ('torch', 'numpy'):
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
sys.argv = [{script!r}, '--help']
runpy.run_path({script!r}, run_name='__main__')
"""


@pytest.mark.parametrize('script', ['prepare.py', 'train.py', 'train_ddp.py', 'sample.py', 'serve.py', 'convert.py',
                                    'bench.py'])
def test_ctrl_c_while_import_torch_runs_is_one_line_and_the_process_ends_by_sigint(script):
    p = subprocess.run([sys.executable, '-c', CTRL_C_IN_IMPORT.format(script=script)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stderr) == (-signal.SIGINT, 'interrupted (Ctrl-C): stopped\n')
