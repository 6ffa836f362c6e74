"""
Every shell command that README.md and docs/*.md show works as typed: this runs each one on the CPU, so an
example that stops working fails `make test`.

Which commands. Every line of a fenced ```bash block is one command (a trailing backslash joins lines); what
follows ` #` is prose for the reader, except an allowance (below). ```python blocks run too, as `python -c`.
Commands belong in ```bash blocks: a fenced block with no language (or sh, shell, console) that holds a
command fails here, so none can hide from this test.

How each runs, in order, page by page. Each page runs in its own temporary folder holding copies of the
repository's scripts, links to config/ and serve.html, and a data/ folder all pages share (an identical `prepare.py`
line runs once). The folder holds the files the docs ask the reader to bring: notes.txt and prompt.txt; and
data/shakespeare/input.txt is a small stand-in for Tiny Shakespeare, which prepare.py reads before any
download. What is appended (size and iteration cuts only, after the command's own options, so they win):

    train.py, train_ddp.py   TRAIN below: 2 iterations of 2 sequences, one eval batch, on the CPU
    sample.py                SAMPLE below: 8 tokens, one sample
    serve.py                 --port=FREE --device=cpu: started in the background, ready once GET /health
                             answers; stopped (SIGINT) when the next server starts or the page ends. curl lines
                             and python blocks that name http://127.0.0.1:8000 are sent to it.
    torchrun                 runs as `python -m torch.distributed.run` with at most 2 processes (gloo)
    make TARGET              the recipe `make -n TARGET` prints, each line as above; pip installs are skipped
                             (the suite runs where the requirements are installed)
    anything else            as typed (prepare.py, convert.py, python3 -m venv, ...)

Allowance. A command that cannot run here as typed (it needs GPUs, several machines, the network, or a file
the reader downloads) says so after it, in its comment, with a reason in parentheses:

    python train.py config/cosmopedia_774m.py  # a GPU run · doc-test: help (GPU-sized)
        runs the command with --help appended instead: the script loads and parses every option before it
        (config files included), and must exit 0; a torchrun line runs its script under python the same way,
        and another program (hf, ...) just gets --help appended.
        A page's python --help lines run together in one process (runpy), so torch is imported once.
    make test  # ... doc-test: skip (it is the suite this runs in)
        does not run it at all: for what --help cannot check (Docker, the suite itself)
"""
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs'))
                               if f.endswith('.md'))
TRAIN = ['--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1', '--batch_size=2',
         '--sample_interval=0', '--device=cpu']
SAMPLE = ['--max_new_tokens=8', '--num_samples=1', '--device=cpu']
OVERRIDES = {'train.py': TRAIN, 'train_ddp.py': TRAIN, 'sample.py': SAMPLE}
ALLOWANCE = re.compile(r'doc-test:\s*(\w+)\s*(?:\((.+)\))?')
COMMANDS = ('python', 'python3', 'torchrun', 'make', 'curl', 'hf', 'docker', 'bash', 'pip')
TIMEOUT = 600  # seconds for one command, on a loaded machine
SERVER = 'http://127.0.0.1:8000'


def blocks(text):
    """(language, first line number, lines) of each fenced block of a markdown text."""
    found, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r'\s*```(\S*)', line)
        if fence and lang is None:
            lang, start, lines = fence[1], n + 1, []
        elif fence:
            found.append((lang, start, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


def commands(text):
    """[(line number, command, allowance or None, reason)] of a page's ```bash blocks, and its python blocks as
    (line number, 'python -c', None, code)."""
    found = []
    for lang, start, lines in blocks(text):
        if lang == 'python':
            found.append((start, 'python -c', None, '\n'.join(lines)))
        if lang != 'bash':
            continue
        joined = []
        for n, line in enumerate(lines, start):
            if joined and joined[-1][1].endswith('\\'):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + ' ' + line.strip())
            elif line.strip():
                joined.append((n, line.strip()))
        for n, line in joined:
            command, _, comment = line.partition(' #')
            allowance = ALLOWANCE.search(comment)
            if allowance and allowance[1] not in ('help', 'skip'):
                raise ValueError(f"line {n}: unknown allowance doc-test: {allowance[1]} (help or skip)")
            if allowance and not allowance[2]:
                raise ValueError(f"line {n}: doc-test: {allowance[1]} needs a reason in parentheses")
            found.append((n, command.strip(), allowance and allowance[1], allowance and allowance[2]))
    return found


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Page:
    """One page's commands, run in its own folder; data/ is shared by all pages."""

    def __init__(self, folder, session):
        self.folder, self.session, self.server, self.url, self.helps = folder, session, None, None, []

    def run_helps(self):
        """The page's `SCRIPT ... --help` lines, in one python process: torch is imported once, not once each."""
        if not self.helps:
            return
        p = self.run([sys.executable, '-c', HELPS, json.dumps([argv for argv, _ in self.helps])], 'the --help lines')
        codes = json.loads(p.stdout.splitlines()[-1])
        for (argv, what), code in zip(self.helps, codes):
            if code not in (0, None):
                pytest.fail(f"{what}\nwith --help exited {code}:\n{(p.stdout + p.stderr)[-3000:]}", pytrace=False)
        self.helps = []

    def run(self, argv, what, check=True):
        env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
        start, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(argv, cwd=self.folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{time.time() - start:5.1f} s ({used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime:4.1f} s CPU)  "
              f"{what.splitlines()[0]}")  # pytest -s shows what each command costs
        if check and p.returncode != 0:
            pytest.fail(f"{what}\nexited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}", pytrace=False)
        return p

    def python(self, words, what, help=False):
        """A `python SCRIPT ...` command: with help, SCRIPT --help (later, with the page's others); else with the cuts
        appended (a server starts)."""
        script = words[1] if len(words) > 1 else ''
        if help:
            return self.helps.append(([*words[1:], '--help'], what))
        if script == 'serve.py':
            return self.serve(words[2:], what)
        if script == 'prepare.py':
            if tuple(words) in self.session['prepared']:
                return None
            self.session['prepared'].add(tuple(words))
        return self.run([sys.executable, *words[1:], *OVERRIDES.get(os.path.basename(script), [])], what)

    def serve(self, args, what):
        self.stop()
        port = free_port()
        self.server = subprocess.Popen([sys.executable, 'serve.py', *args, f'--port={port}', '--device=cpu'],
                                       cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=dict(os.environ, OMP_NUM_THREADS='1'))
        self.url = f'http://127.0.0.1:{port}'
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.server.poll() is not None:
                pytest.fail(f"{what}\nexited {self.server.returncode}:\n{self.server.stdout.read()[-3000:]}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(self.url + '/health', timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"{what}\nnever answered GET /health", pytrace=False)

    def stop(self):
        if self.server:
            self.server.send_signal(signal.SIGINT)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server = None

    def command(self, line, allowance, what):
        """Run one command line (parts joined by && run in turn)."""
        for part in line.split(' && '):
            words = shlex.split(part)
            program = words[0]
            if program in ('python', 'python3') and len(words) > 1 and words[1].endswith('.py'):
                self.python(words, what, allowance == 'help')
            elif program == 'torchrun':
                self.torchrun(words, what, allowance == 'help')
            elif program == 'make':
                self.make(words, what, allowance == 'help')
            elif program == 'curl':
                if not self.url:
                    pytest.fail(f"{what}\nno server started before it on this page", pytrace=False)
                self.run(['curl', '-sSf', '--max-time', '120', *[w.replace(SERVER, self.url) for w in words[1:]]], what)
            elif allowance == 'help':
                self.run([*words, '--help'], what)
            else:
                self.run(['bash', '-c', part], what)

    def torchrun(self, words, what, help):
        at = next(i for i, w in enumerate(words) if w.endswith('.py'))
        script, args = words[at], words[at + 1:]
        if help:
            return self.helps.append(([script, *args, '--help'], what))
        launch = []
        for w in words[1:at]:
            n = re.fullmatch(r'--nproc[-_]per[-_]node=(\d+)', w)
            launch.append(f'--nproc_per_node={min(int(n[1]), 2)}' if n else w)
        self.run([sys.executable, '-m', 'torch.distributed.run', *launch, script, *args, *TRAIN], what)

    def make(self, words, what, help):
        recipe = self.run(['make', '-n', '-f', os.path.join(ROOT, 'Makefile'), f'PYTHON={sys.executable}',
                           *words[1:]], what)
        for line in recipe.stdout.splitlines():
            parts = shlex.split(line)
            if parts and parts[0] == sys.executable and len(parts) > 1 and parts[1].endswith('.py'):
                self.python(['python', *parts[1:]], f"{what}\n(recipe line: {line})", help)


# runs each argv's script as __main__ in turn, and prints their exit codes as the last line
HELPS = """
import json, runpy, sys
codes = []
for sys.argv in json.loads(sys.argv[1]):
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps(codes))
"""

STAND_IN = ''.join(f"{who}:\n{line}\n\n" for who, line in [
    ('ROMEO', 'Before we proceed any further, hear me speak.'), ('JULIET', 'The king is in his counting house.'),
    ('MENENIUS', 'What says the other troop? Why, they are dissolved: hang them!'),
    ('FIRST CITIZEN', 'We are accounted poor citizens, the patricians good; quickly, zealous jokes vex.'),
]) * 60


@pytest.fixture(scope='module')
def session(tmp_path_factory):
    data = tmp_path_factory.mktemp('docs-data')
    os.makedirs(data / 'shakespeare')
    (data / 'shakespeare' / 'input.txt').write_text(STAND_IN)
    return {'data': data, 'prepared': set()}


def page_folder(tmp_path, session):
    """A folder to run a page's commands in: copies of the scripts (a script finds data/ and the modules it
    imports beside its real path, so links would lead back to the repository), links to the rest."""
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
        elif name in ('config', 'serve.html', 'requirements.txt', 'requirements-extra.txt', 'Makefile', 'tests'):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    os.symlink(session['data'], tmp_path / 'data')
    (tmp_path / 'notes.txt').write_text(STAND_IN.replace('ROMEO', 'NOTES'))
    (tmp_path / 'prompt.txt').write_text('ROMEO:\n')
    return tmp_path


@pytest.mark.parametrize('page', PAGES)
def test_every_command_a_page_shows_runs_as_typed(page, session, tmp_path):
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
    run = Page(page_folder(tmp_path, session), session)
    try:
        for n, line, allowance, reason in commands(text):
            what = f"{page}:{n}: {line}"
            if line == 'python -c':
                run.run([sys.executable, '-c', reason.replace(SERVER, run.url or SERVER)], f"{page}:{n}: python block")
            elif allowance != 'skip':
                run.command(line, allowance, what)
        run.run_helps()
    finally:
        run.stop()


@pytest.mark.parametrize('page', PAGES)
def test_commands_are_in_bash_blocks_where_this_test_finds_them(page):
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
    commands(text)  # every allowance is well formed
    for lang, start, lines in blocks(text):
        for n, line in enumerate(lines, start):
            if lang in ('', 'sh', 'shell', 'console') and line.split() and line.split()[0].lstrip('$') in COMMANDS:
                pytest.fail(f"{page}:{n}: a command outside a ```bash block: {line}", pytrace=False)


def test_a_broken_example_fails_and_says_which(session, tmp_path):
    page = "Run this:\n\n```bash\npython prepare.py shakespeare_char\npython train.py --dataset=shakespeare_char " \
           "--no_such_option=1\n```\n"
    run = Page(page_folder(tmp_path, session), session)
    lines = commands(page)
    assert [line for _, line, _, _ in lines][1].endswith('--no_such_option=1')
    run.command(lines[0][1], None, 'prepare')
    with pytest.raises(pytest.fail.Exception, match=r"no_such_option.*\n.*exited 2.*\n.*unknown option"):
        run.command(lines[1][1], None, lines[1][1])


def test_every_script_answers_help_without_torchrun_or_the_extras():
    """--help lists a script's options where it cannot run: train_ddp.py outside torchrun, serve.py without FastAPI."""
    scripts = ['prepare.py', 'train.py', 'train_ddp.py', 'sample.py', 'serve.py', 'convert.py', 'bench.py']
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')}
    p = subprocess.run([sys.executable, '-c', "import sys; sys.modules['fastapi'] = None\n" + HELPS,
                        json.dumps([[script, '--help'] for script in scripts])], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert json.loads(p.stdout.splitlines()[-1]) == [0] * len(scripts), p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count('options (default, what it does):') == len(scripts)
    assert 'serve.py needs FastAPI and uvicorn' in p.stdout and '--max_batch=8' in p.stdout
