"""serve.py: the real server on a tiny checkpoint, driven by the openai package, raw HTTP and a real browser.
Batched text equals text alone and sample.py's; bad input is a 4xx and the server goes on; a client that goes
away frees its row; the page streams and stops."""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

import checkpoint
import sample
import serve
from conftest import BLOCK, save_model, script_error
from engine import Engine, Sequence
from generate import Sampling, generate
from tokenizer import Tokenizer

openai = pytest.importorskip("openai")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_model(str(tmp_path_factory.mktemp("run") / "tiny-char" / "ckpt.pt"))


def start(*argv):
    """serve.py's app for argv, serving on a free port from a thread: (base URL, engine, stop)."""
    app, _, _ = serve.build(list(argv))
    url, stop = serve.start_in_thread(app)
    return url, app.state.engine, stop


@pytest.fixture(scope="module")
def server(ckpt):
    url, engine, stop = start(f"--ckpt={ckpt}", "--dtype=float32", "--max_batch=12", "--max_queue=16",
                               "--max_body=100000")
    yield url, engine
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def call(url, body=None):
    """(status, JSON answer) of a GET, or of a POST of body (a dict, or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until(condition, seconds=10):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def healthy(url):
    try:
        return call(url + "/health")[0] == 200
    except OSError:  # not listening yet
        return False


@contextmanager
def rows_taken(engine):
    """The test's way to line requests up: while inside, the idle engine has no free row, so what arrives waits;
    on leaving, everything waiting is admitted at once."""
    with engine.cv:
        rows, engine.free[:] = engine.free[:], []
    try:
        yield
    finally:
        with engine.cv:
            engine.free.extend(rows)
            engine.cv.notify()


@contextmanager
def slowed(engine, seconds):
    """Every decoding step takes seconds longer, so that a test can act while a stream is still going."""
    decode = engine.decode
    engine.decode = lambda rows: (time.sleep(seconds), decode(rows))
    try:
        yield
    finally:
        del engine.decode


@contextmanager
def recording(engine):
    """The list of sequences submitted to the engine while inside."""
    seqs, submit = [], engine.submit
    engine.submit = lambda new: (seqs.extend(new), submit(new))[1]
    try:
        yield seqs
    finally:
        del engine.submit


def test_the_openai_client_completes_and_chats_streaming_and_not(client):
    assert [m.id for m in client.models.list().data] == ["tiny-char"]
    whole = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=20, temperature=0)
    streamed = list(client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=20, temperature=0,
                                              stream=True))
    text = whole.choices[0].text
    assert len(text) == 20 and whole.choices[0].finish_reason == "length" and len(set(text)) >= 4
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (6, 20)
    assert "".join(c.choices[0].text for c in streamed) == text and streamed[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who is there?"}]
    chat = client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=12, temperature=0)
    deltas = list(client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    reply = chat.choices[0].message
    assert reply.role == "assistant" and reply.content and chat.choices[0].finish_reason in ("length", "stop")
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.content
    # the template is a play: the same text through /v1/completions gives the same reply
    prompt = "SYSTEM:\nSpeak verse.\n\nUSER:\nWho is there?\n\nASSISTANT:\n"
    assert client.completions.create(prompt=prompt, max_tokens=12, temperature=0, stop="\n\n",
                                     model="tiny-char").choices[0].text == reply.content


def test_greedy_and_seeded_text_equal_sample_py(ckpt, client, capsys):
    # the server decodes through per-row positions and draws from a torch.Generator per request; sample.py
    # through the int path and torch's global generator seeded alike: the same tokens either way
    for temperature, seed in ((0, 0), (1.0, 5)):
        sample.main([f"--ckpt={ckpt}", "--start=ROMEO:", "--max_new_tokens=40", f"--temperature={temperature}",
                     f"--seed={seed}", "--dtype=float32", "--quiet"])
        served = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=40, temperature=temperature,
                                           seed=seed).choices[0].text
        assert capsys.readouterr().out == "ROMEO:" + served + "\n" and len(set(served)) >= 4


def test_a_requests_text_does_not_depend_on_the_rest_of_the_batch(server, client):
    _, engine = server
    greedy = dict(prompt="ROMEO:", max_tokens=40, temperature=0)
    seeded = dict(prompt="JULIET:\nO Romeo, Romeo", max_tokens=30, temperature=1.0, seed=7)
    others = [dict(prompt="ab" * k, max_tokens=5 + 4 * k, temperature=0.8, seed=k) for k in range(1, 8)]

    def complete(kw):
        return client.completions.create(model="tiny-char", **kw).choices[0].text
    alone = [complete(greedy), complete(seeded)]
    with ThreadPoolExecutor(9) as pool:
        with rows_taken(engine):  # all 9 wait, then start together: one batch of 9 rows of different lengths
            futures = [pool.submit(complete, kw) for kw in [greedy, *others, seeded]]
            until(lambda: engine.load() == (0, 9))
        texts = [f.result() for f in futures]
    assert [texts[0], texts[-1]] == alone and len(set(texts[1:-1])) > 1


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(ckpt, client):
    prompt = "ROMEO:\nO, she doth teach the torches"
    out = client.completions.create(model="tiny-char", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice, lp = out.choices[0], out.choices[0].logprobs
    model, ck = checkpoint.load_model(ckpt)
    ids = torch.tensor([[ck["meta"]["chars"].index(c) for c in prompt]])
    with torch.no_grad():
        logp = model(ids)[0][0, :-1].log_softmax(-1)
    expected = logp.gather(1, ids[0, 1:, None])[:, 0]
    assert choice.text == prompt and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert lp.tokens == list(prompt) and lp.text_offset == list(range(len(prompt))) and lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    top = logp[5].topk(3)  # the alternatives after "ROMEO:"
    assert list(lp.top_logprobs[6].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    generated = client.completions.create(model="tiny-char", prompt=prompt, max_tokens=5, logprobs=0, temperature=0)
    assert "".join(generated.choices[0].logprobs.tokens) == generated.choices[0].text


def test_a_stop_string_ends_the_text_before_it_and_a_partial_one_is_held_back_then_shown(client):
    full = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    cut, never = full[10:13], full[5:7] + "@"  # "@" is no character of the model's: the whole string never comes
    for stop, text, reason in ((cut, full[:full.index(cut)], "stop"), (never, full, "length")):
        chunks = list(client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=40, temperature=0,
                                                stop=["xyz", stop], stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == reason


def test_the_end_of_text_token_ends_a_sequence_and_is_not_in_its_text(ckpt):
    model, ck = checkpoint.load_model(ckpt)
    chars = ck["meta"]["chars"]
    ids = [chars.index(c) for c in "ROMEO:"]
    greedy = generate(model, torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()
    eot = greedy[6]  # as if the sixth new token were the end of the document
    tok = Tokenizer("char", len(chars), None, lambda t: "".join(chars[i] for i in t), eot=eot)
    engine, chunks = Engine(model, tok, max_batch=2), []
    engine.submit([Sequence(ids, 10, chunks.append, Sampling(temperature=0))])
    until(lambda: chunks and chunks[-1].finish_reason)
    engine.close()
    end = greedy.index(eot)
    assert "".join(c.text for c in chunks) == tok.decode(greedy[:end]) and chunks[-1].finish_reason == "stop"


BAD = [  # (path, body, status, param)
    ("completions", b'{"prompt": "ROMEO:",', 400, None),
    ("completions", [1, 2], 400, None),
    ("completions", {"max_tokens": 5}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": "a", "max_tokens": "10"}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": BLOCK + 1}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("completions", {"prompt": "a", "stop": ["", "x"]}, 400, "stop"),
    ("completions", {"prompt": "Zoë says «hi»"}, 400, "prompt"),
    ("completions", {"prompt": "", "max_tokens": 3}, 400, "prompt"),
    ("completions", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Zoë"}]}, 400, "messages"),
    ("nowhere", {"prompt": "a"}, 404, None),
]


def test_each_bad_request_gets_its_error_and_the_server_goes_on(server, capfd):
    url, _ = server
    for path, body, status, param in BAD:
        got, answer = call(f"{url}/v1/{path}", body)
        assert (got, set(answer["error"]), answer["error"]["param"]) == (
            status, {"message", "type", "param", "code"}, param), (path, body, answer)
        assert call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})[0] == 200
    message = call(f"{url}/v1/completions", {"prompt": "Zoë says «hi»"})[1]["error"]["message"]
    assert "vocabulary: 'ë' '«' '»'" in message  # tokenizer.encode_prompt's message, as sample.py's
    assert "Traceback" not in capfd.readouterr().err


def test_a_body_over_the_limit_is_413_and_a_full_queue_is_429_at_once(server):
    url, engine = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "a" * 150_000}).encode()
    for headers, data in (({"Content-Length": 10 ** 9}, b""),  # refused on its length alone, before any body
                          ({"Transfer-Encoding": "chunked"}, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/completions")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(data)
        r = conn.getresponse()
        assert r.status == 413 and "limit of 100000 bytes" in json.loads(r.read())["error"]["message"]
        conn.close()
    with ThreadPoolExecutor(1) as pool, rows_taken(engine):
        waiting = pool.submit(call, f"{url}/v1/completions", {"prompt": "ROMEO:", "n": 16, "max_tokens": 2})
        until(lambda: engine.load() == (0, 16))  # --max_queue=16 are waiting
        t0 = time.perf_counter()
        status, answer = call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 2})
        assert status == 429 and time.perf_counter() - t0 < 5 and answer["error"]["code"] == "queue_full"
    assert waiting.result()[0] == 200 and len(waiting.result()[1]["choices"]) == 16


def test_with_an_api_key_every_v1_call_needs_it(ckpt):
    url, _, stop = start(f"--ckpt={ckpt}", "--dtype=float32", "--api_key=s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        status, answer = call(f"{url}/v1/completions", {"prompt": "a"})  # no key at all
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model="tiny-char", prompt="a", max_tokens=2).choices[0].text
        assert urllib.request.urlopen(url + "/").status == 200  # the page and /health stay open
        assert call(f"{url}/health")[1]["status"] == "ok"
    finally:
        stop()


def test_a_client_that_disconnects_frees_its_row_and_the_others_go_on(server, client):
    _, engine = server
    with slowed(engine, 0.05), recording(engine) as seqs:
        gone, stays = (client.completions.create(model="tiny-char", prompt=p, max_tokens=40, stream=True)
                       for p in ("ROMEO:", "JULIET:"))
        next(iter(gone)), next(iter(stays))
        until(lambda: engine.load()[0] == 2)
        gone.close()
        until(lambda: engine.load()[0] == 1)
        assert seqs[0].cancelled and len(seqs[0].tokens) < 30  # it left soon after, not at its 40th token
        rest = list(stays)
    assert len("".join(c.choices[0].text for c in rest)) == 40 - 1 and rest[-1].choices[0].finish_reason == "length"
    until(lambda: engine.load() == (0, 0))


def test_a_failing_step_ends_its_requests_with_a_500_and_the_server_goes_on(server, capfd):
    url, engine = server

    def broken(rows):  # one step fails, as out of memory would
        del engine.decode
        raise RuntimeError("out of memory, say")
    engine.decode = broken
    status, answer = call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 5})
    assert status == 500 and answer["error"]["message"] == "the engine failed: RuntimeError: out of memory, say"
    assert call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 5})[0] == 200
    assert engine.load() == (0, 0)
    err = capfd.readouterr().err
    assert "error: the engine failed: RuntimeError: out of memory, say" in err and "Traceback" not in err


def test_with_speculative_the_server_sends_plain_greedy_text_and_health_reports_the_acceptance(server, tmp_path):
    assert "speculative" not in call(server[0] + "/health")[1]  # a server without --speculative
    mtp = save_model(str(tmp_path / "tiny-mtp" / "ckpt.pt"), mtp_depth=1)
    url, engine, stop = start(f"--ckpt={mtp}", "--dtype=float32", "--speculative")
    try:
        assert call(url + "/health")[1]["speculative"] == {"drafted": 0, "accepted": 0, "acceptance_rate": None}
        status, answer = call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0})
        health = call(url + "/health")[1]["speculative"]
    finally:
        stop()
    model, ck = checkpoint.load_model(mtp)
    ids = torch.tensor([[ck["meta"]["chars"].index(c) for c in "ROMEO:"]])
    greedy = "".join(ck["meta"]["chars"][i] for i in generate(model, ids, 30, temperature=0)[0, 6:])
    assert status == 200 and answer["choices"][0]["text"] == greedy
    assert health["drafted"] > 0 and health == {**engine.drafting,
                                                "acceptance_rate": engine.drafting["accepted"] / health["drafted"]}


def browser():
    """Playwright and a Chromium, or a skip that says which is missing (a failure in CI, where both must be)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright and path:
        return sync_playwright, path
    reason = "the browser test needs " + ("Chromium (apt-get install chromium)" if not path else
                                          "Playwright (pip install -r requirements-extra.txt)")
    if os.environ.get("CI"):
        pytest.fail(reason + ", and CI must run it")
    pytest.skip(reason)


def test_the_page_streams_text_into_a_real_browser_and_stop_stops_it(server, client):
    sync_playwright, chromium = browser()
    url, engine = server
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium)
        page = b.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('title').textContent.includes('tiny-char')")
        page.fill("#prompt", "ROMEO:")
        with slowed(engine, 0.05), recording(engine) as seqs:
            page.click("#generate")
            page.wait_for_function("document.getElementById('completion').textContent.length >= 3")
            assert engine.load()[0] == 1
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
            shown = page.text_content("#completion")
            until(lambda: engine.load() == (0, 0))
            assert seqs[0].cancelled and len(seqs[0].tokens) < 30  # the server stopped too, not only the page
            time.sleep(0.3)
            assert page.text_content("#completion") == shown and len(shown) >= 3
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "25")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')")
        greedy = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=25, temperature=0)
        assert page.text_content("#completion") == greedy.choices[0].text
        assert page.text_content("#status").startswith("25 tokens in ")
        b.close()


def test_the_command_serves_until_ctrl_c_and_bad_options_get_one_line(ckpt, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"serving {ckpt} as model 'tiny-char'") and f"http://127.0.0.1:{port}" in line
        until(lambda: healthy(f"http://127.0.0.1:{port}"), seconds=30)
        assert call(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0 and "Traceback" not in err and err.strip() == "stopped"
    assert "max_batch" in script_error(capsys, serve.main, f"--ckpt={ckpt}", "--max_batch=0")
    assert "no checkpoint" in script_error(capsys, serve.main, f"--out_dir={tmp_path}")
    assert script_error(capsys, serve.main, f"--ckpt={ckpt}", "--speculative").endswith(
        "has none (mtp_depth=0): train with --mtp_depth=1, or serve without --speculative")
