"""serve.py: the real server on a tiny checkpoint, driven by the openai package, raw HTTP and a real browser.
Batched text equals text alone and sample.py's; bad input is a 4xx and the server goes on; a client that goes
away frees its row; the page streams and stops."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
from tokenizer import Tokenizer, get_tokenizer

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

    messages = [{"role": "system", "content": "Verse."}, {"role": "user", "content": "Who?"}]
    chat = client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=12, temperature=0)
    deltas = list(client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    reply = chat.choices[0].message
    assert reply.role == "assistant" and reply.content and chat.choices[0].finish_reason in ("length", "stop")
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply.content
    # the template is a play: the same text through /v1/completions gives the same reply
    prompt = "SYSTEM:\nVerse.\n\nUSER:\nWho?\n\nASSISTANT:\n"
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


def own_logprobs(model, ids):
    """The model's own log-probabilities [len(ids), V] after each of ids, in float32 and without a cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def test_token_id_prompts_complete_and_score_as_their_text(server, client):
    url, _ = server
    ids = call(url + "/tokenize", {"prompt": "ROMEO:"})[1]["tokens"]  # vLLM's tokenizer API, as lm-eval uses it
    assert len(ids) == 6 and call(url + "/detokenize", {"tokens": ids})[1] == {"prompt": "ROMEO:"}
    scoring = dict(model="tiny-char", max_tokens=8, temperature=0, echo=True, logprobs=2)
    by_text = client.completions.create(prompt="ROMEO:", **scoring).choices[0]
    by_ids = client.completions.create(prompt=ids, **scoring).choices[0]
    several = client.completions.create(prompt=[ids, ids[:3]], **scoring).choices  # a list of lists: two prompts
    assert by_ids.text == by_text.text == several[0].text and by_text.text.startswith("ROMEO:")
    assert by_ids.logprobs.token_logprobs == by_text.logprobs.token_logprobs
    assert several[1].text.startswith("ROM") and several[1].text != several[0].text[:len(several[1].text)]


def test_a_prompt_longer_than_the_context_is_refused_saying_the_context_never_cropped(client):
    for prompt in ("ab" * BLOCK, [1] * (BLOCK + 1), [[1, 2], [1] * (BLOCK + 1)]):
        with pytest.raises(openai.BadRequestError, match=f"more than this model's context of {BLOCK} tokens"):
            client.completions.create(model="tiny-char", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    whole = client.completions.create(model="tiny-char", prompt="ab" * (BLOCK // 2), max_tokens=0, echo=True,
                                      logprobs=1)
    assert len(whole.choices[0].logprobs.tokens) == BLOCK  # a prompt of exactly the context is scored whole


def test_models_retrieve_knows_the_served_model_only(client):
    model = client.models.retrieve("tiny-char")
    assert (model.id, model.object, model.max_model_len) == ("tiny-char", "model", BLOCK)
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-char'"):
        client.models.retrieve("gpt-4o")


def test_chat_keeps_its_end_of_reply_whatever_stop_the_client_adds(server, client):
    _, engine = server
    messages = [{"role": "user", "content": "Who?"}]
    newline = {"0": 100}  # logit_bias: the model writes nothing but "\n" (id 0), so the reply ends at once
    for stop in (["zzz"], "\n\n", None):
        reply = client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=20, stop=stop,
                                               logit_bias=newline).choices[0]
        assert (reply.message.content, reply.finish_reason) == ("", "stop")
    with recording(engine) as seqs:
        client.chat.completions.create(model="tiny-char", messages=messages, max_tokens=3, stop=["zzz", "\n\n"])
    assert seqs[0].stop == ("zzz", "\n\n")


def test_penalties_and_logit_bias_choose_as_the_one_sampling_function_does(ckpt, client):
    model, ck = checkpoint.load_model(ckpt)
    chars = ck["meta"]["chars"]
    ids = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    plain = "".join(chars[i] for i in generate(model, ids, 40, temperature=0)[0, 6:])
    favourite = chars.index(max(set(plain), key=plain.count))
    settings = dict(presence_penalty=0.5, frequency_penalty=1.5, logit_bias={favourite: -100, chars.index("e"): 3.0})
    expected = "".join(chars[i] for i in generate(model, ids, 40, temperature=0, **settings)[0, 6:])
    served = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=40, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=1.5,
                                       logit_bias={str(k): v for k, v in settings["logit_bias"].items()})
    assert served.choices[0].text == expected != plain and chars[favourite] not in expected
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny-char", prompt="a", logit_bias={"e": 1})


def test_a_completion_slides_past_the_context_and_equals_sample_py(ckpt, client, capsys):
    n = 500  # the length `make demo` samples; the 48-token context slides ten times over
    sample.main([f"--ckpt={ckpt}", "--start=ROMEO:", f"--max_new_tokens={n}", "--temperature=0", "--dtype=float32",
                 "--quiet"])
    served = client.completions.create(model="tiny-char", prompt="ROMEO:", max_tokens=n, temperature=0)
    assert served.usage.completion_tokens == n and served.choices[0].finish_reason == "length"
    text = served.choices[0].text
    assert capsys.readouterr().out == "ROMEO:" + text + "\n" and len(set(text)) >= 4


def test_chat_logprobs_are_the_models_own_with_their_bytes(ckpt, client):
    asked = dict(model="tiny-char", messages=[{"role": "user", "content": "Who?"}], max_tokens=10, temperature=0,
                 logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**asked).choices[0]
    streamed = [c.choices[0].logprobs.content for c in client.chat.completions.create(**asked, stream=True)
                if c.choices and c.choices[0].logprobs]
    content = whole.logprobs.content
    assert [t.model_dump() for t in content] == [t.model_dump() for part in streamed for t in part]
    assert whole.message.content.startswith("".join(t.token for t in content)[:len(whole.message.content)])
    model, ck = checkpoint.load_model(ckpt)
    chars = ck["meta"]["chars"]
    prompt = [chars.index(c) for c in serve.chat_prompt([serve.Message(role="user", content="Who?")])]
    tokens = [chars.index(t.token) for t in content]
    logp = own_logprobs(model, prompt + tokens)[len(prompt) - 1:-1]
    expected = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([t.logprob for t in content]), expected, atol=1e-4)
    for t, row in zip(content, logp):
        top = row.topk(3)
        assert t.bytes == list(t.token.encode()) and t.top_logprobs[0].token == t.token  # greedy: the likeliest
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [a.token for a in t.top_logprobs] == [chars[i] for i in top.indices.tolist()]
    plain = client.chat.completions.create(**{**asked, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory):
    """A server of a tiny random model with the GPT-2 tokenizer (byte-level BPE, an end-of-text token):
    (base URL, checkpoint path)."""
    path = save_model(str(tmp_path_factory.mktemp("run") / "tiny-gpt2" / "ckpt.pt"), meta={"tokenizer": "gpt2"},
                      vocab_size=50257)
    url, _, stop = start(f"--ckpt={path}", "--dtype=float32")
    yield url, path
    stop()


def test_multi_byte_characters_show_as_bytes_and_offsets_count_characters(gpt2_server):
    url, _ = gpt2_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompt = "Zoë’s café — naïve"  # ’ and — are two GPT-2 tokens each, split inside the character
    out = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=4, echo=True, logprobs=1,
                                    temperature=0).choices[0]
    text, tokens, offsets = out.text, out.logprobs.tokens, out.logprobs.text_offset
    assert text.startswith(prompt) and "\ufffd" not in prompt
    assert tokens[3:5] == ["bytes:\\xe2\\x80", "bytes:\\x99"]  # OpenAI's way of writing a part of a character
    for token, offset in zip(tokens, offsets):
        if token.startswith("bytes:"):  # a token inside a character points at that character
            assert text[offset] == "\ufffd" or text[offset] in "’—"
        else:
            assert text[offset:offset + len(token)] == token
    assert offsets[3:6] == [3, 3, 4]  # "’" is the fourth character; "s" follows it
    marked = client.completions.create(model="tiny-gpt2", prompt="<|endoftext|>Hello", max_tokens=0, echo=True,
                                       logprobs=0)  # the end-of-text marker written as text is that one token
    assert marked.usage.prompt_tokens == 2 and marked.choices[0].logprobs.tokens == ["<|endoftext|>", "Hello"]
    chat = client.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=6, temperature=0, logprobs=True).choices[0]
    for t in chat.logprobs.content:
        assert bytes(t.bytes).decode(errors="replace") == t.token or t.token.startswith("bytes:")


def test_a_client_that_goes_away_mid_body_leaves_at_most_a_line_in_the_log(server, capfd):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    for rest in (b'Content-Length: 1000\r\n\r\n{"prompt": "RO', b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"pro\r\n'):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + rest)
            time.sleep(0.2)
        time.sleep(0.3)
    assert call(f"{url}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})[0] == 200
    err = capfd.readouterr().err
    assert len(err.splitlines()) <= 2 and "Traceback" not in err and "Exception" not in err


LM_EVAL_TASKS = {  # one local lm-eval task of each kind of request: (its settings, its documents)
    "tiny_ppl": ("output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                 "metric_list:\n  - metric: bits_per_byte\n",
                 [{"text": "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First "
                           "Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
                           "First Citizen: First, you know Caius Marcius is chief enemy to the people. All: We "
                           "know't, we know't. First Citizen: Let us kill him, and we'll have corn at our own "
                           "price. Is't a verdict?"},  # three windows of the context
                  {"text": "Zoë’s café — naïve résumé. ROMEO: But, soft! what light through yonder window "
                           "breaks?"}]),
    "tiny_mc": ("output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
                [{"question": "The capital of France is", "choices": ["Paris", "London", "Rome"], "answer": 0},
                 {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0}]),
    "tiny_gen": ("output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                 "generation_kwargs:\n  until: ['\\n\\n', '.']\n  max_gen_toks: 8\n"
                 "metric_list:\n  - metric: exact_match\n",
                 [{"question": "ROMEO: Who is there?", "answer": "JULIET"}, {"question": "Say:", "answer": "hi"}]),
}


def lm_eval_samples(out, task):
    """The documents of one task that lm-eval's --log_samples wrote under out, in order."""
    path, = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith(f"samples_{task}_")]
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda doc: doc["doc_id"])


def test_lm_eval_with_its_defaults_scores_through_the_server_as_the_model_does(gpt2_server, tmp_path):
    """lm-eval's local-completions model, as docs/evaluation.md runs it (token-id prompts, the server's own
    tokenizer through /tokenize), over local tasks of each kind; every number it logs equals the model's own."""
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("lm-eval is not installed (pip install -r requirements-extra.txt), and CI must run this")
        pytest.skip("lm-eval is not installed: pip install -r requirements-extra.txt")
    url, path = gpt2_server
    for task, (settings, docs) in LM_EVAL_TASKS.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp_path / f"{task}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                               f"    test: {tmp_path / task}.jsonl\ntest_split: test\n{settings}")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
            f"model=tiny-gpt2,base_url={url}/v1/completions,max_length={BLOCK}", "--tasks", ",".join(LM_EVAL_TASKS),
            "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Using remote tokenizer backend" in run.stderr  # lm-eval found /tokenizer_info and /tokenize

    model, _ = checkpoint.load_model(path)
    tok = get_tokenizer("gpt2")

    def loglikelihood(context, continuation):  # as lm-eval asks it: the request cropped to max_length - 1
        ids = (context + continuation)[-(BLOCK - 1):]
        logp = own_logprobs(model, ids)[len(ids) - len(continuation) - 1:-1]
        return logp.gather(1, torch.tensor(continuation)[:, None]).sum().item()

    for doc in lm_eval_samples(tmp_path / "out", "tiny_ppl"):  # the passage in windows of the context
        windows = map(make_disjoint_window, get_rolling_token_windows(tok.encode(doc["doc"]["text"]), tok.eot,
                                                                      BLOCK - 2, 1))
        assert float(doc["resps"][0][0]) == pytest.approx(sum(loglikelihood(*w) for w in windows), rel=1e-5)
    for doc in lm_eval_samples(tmp_path / "out", "tiny_mc"):
        question = doc["doc"]["question"]
        for (score, _), choice in zip(doc["filtered_resps"], doc["doc"]["choices"]):
            context, whole = tok.encode(question), tok.encode(f"{question} {choice}")
            assert float(score) == pytest.approx(loglikelihood(context, whole[len(context):]), rel=1e-5)
    for doc in lm_eval_samples(tmp_path / "out", "tiny_gen"):
        ids = tok.encode(doc["doc"]["question"])
        for _ in range(8):  # greedy, without a cache
            ids.append(own_logprobs(model, ids)[-1].argmax().item())
        greedy = tok.decode(ids[len(tok.encode(doc["doc"]["question"])):])
        assert doc["resps"][0][0] == greedy.split("\n\n")[0].split(".")[0]


BAD = [  # (path, body, status, param)
    ("completions", b'{"prompt": "ROMEO:",', 400, None),
    ("completions", [1, 2], 400, None),
    ("completions", {"max_tokens": 5}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": "a", "max_tokens": "10"}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": 4097}, 400, "max_tokens"),  # over --max_tokens_limit, not BLOCK
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
    ("completions", {"prompt": "a" * (BLOCK + 1), "echo": True, "logprobs": 1, "max_tokens": 0}, 400, "prompt"),
    ("completions", {"prompt": [[1] * (BLOCK + 1)], "max_tokens": 1}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 99], "max_tokens": 1}, 400, "prompt"),  # no token 99 in 62 characters
    ("completions", {"prompt": [None, 2], "max_tokens": 1}, 400, "prompt"),
    ("completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("completions", {"prompt": "a", "best_of": 2}, 400, "best_of"),
    ("completions", {"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("completions", {"prompt": "a", "logit_bias": {"1": 101}}, 400, "logit_bias"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21, "logprobs": True},
     400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
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


def test_only_the_engine_thread_runs_parallel_ops_on_one_thread_fewer_than_the_cores(ckpt):
    """A second thread with an OpenMP team of its own (the one that loaded the model) makes OpenMP sleep its
    threads between the ops of each step: 2-3x slower decoding (BENCHMARKS.md, section 7)."""
    torch.set_num_threads(3)  # the cores, as torch sees them (the one_thread fixture restores its own)
    url, engine, stop = start(f"--ckpt={ckpt}", "--dtype=float32")
    try:
        assert torch.get_num_threads() == 1  # the thread that loaded the model and answers HTTP
        seen, done = [], threading.Event()
        engine.submit([Sequence([1, 2, 3], 4, emit=lambda c: (seen.append(torch.get_num_threads()),
                                                                c.finish_reason and done.set()))])
        assert done.wait(60) and set(seen) == {2}  # emit runs on the engine thread
    finally:
        stop()
        torch.set_num_threads(1)


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
    url, engine, stop = start(f"--ckpt={mtp}", "--dtype=float32", "--speculative", "--drafts=3")  # 2 chained
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
    assert health["drafted"] > 0 and health["drafted"] % 3 == 0 and health == {**engine.drafting,
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
        assert int(page.input_value("#max_tokens")) == 256 > BLOCK  # not clamped to the context: it slides
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_until_ctrl_c_and_bad_options_get_one_line(ckpt, tmp_path, capsys):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}", f"--port={port}"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # threads crawl on a shared machine
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"serving {ckpt} as model 'tiny-char'") and f"http://127.0.0.1:{port}" in line
        # printed once the port is bound: no waiting for it to answer
        assert call(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})[0] == 200
        assert f"--port={port + 1}" in script_error(capsys, serve.main, f"--ckpt={ckpt}", f"--port={port}")
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0 and err.strip() == "stopped on SIGINT"
    assert "max_batch" in script_error(capsys, serve.main, f"--ckpt={ckpt}", "--max_batch=0")
    assert "no checkpoint" in script_error(capsys, serve.main, f"--out_dir={tmp_path}")
    assert script_error(capsys, serve.main, f"--ckpt={ckpt}", "--speculative").endswith(
        "has none (mtp_depth=0): train with --mtp_depth=1, or serve without --speculative")
    assert "add --speculative" in script_error(capsys, serve.main, f"--ckpt={ckpt}", "--drafts=3")


def events(response):
    """The data of each Server-Sent Event of a streamed response, to its end."""
    return [line[6:].strip().decode() for line in response if line.startswith(b"data: ")]


def test_sigterm_drains_the_streams_then_exits_0(ckpt):
    port, drain = free_port(), 4
    slowed_serve = ("import sys, time, engine, serve; decode = engine.Engine.decode; "
                    "engine.Engine.decode = lambda self, rows: (time.sleep(0.1), decode(self, rows)); "
                    "serve.main(sys.argv[1:])")  # every step 0.1 s: 8 tokens take 0.8 s, 100 tokens 10 s
    proc = subprocess.Popen([sys.executable, "-c", slowed_serve, f"--ckpt={ckpt}", f"--port={port}", "--dtype=float32",
                             f"--drain_timeout={drain}"], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # threads crawl on a shared machine
    try:
        assert proc.stderr.readline().startswith("serving ")
        streams = []
        for max_tokens in (8, 8, 100, 100):  # two end within the drain timeout, two are still going at its end
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/completions", json.dumps(dict(prompt="ROMEO:", max_tokens=max_tokens,
                                                                    temperature=0, stream=True)))
            streams.append(conn.getresponse())  # the headers: the sequence is in the engine
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        health = f"http://127.0.0.1:{port}/health"
        until(lambda: call(health)[1]["status"] == "draining", seconds=drain)
        assert call(health)[0] == 503
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", b'{"prompt": "a"}')
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"]
        assert json.loads(refused.value.read())["error"]["code"] == "shutting_down"
        ends = [events(r)[-2:] for r in streams]
        # the drain, then uvicorn's and the interpreter's own stopping, which take seconds on a loaded machine
        assert proc.wait(timeout=drain + 30) == 0 and time.monotonic() - t0 < drain + 30
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert [json.loads(end)["choices"][0]["finish_reason"] for end, _ in ends] == ["length"] * 2 + ["shutdown"] * 2
    assert all(done == "[DONE]" for _, done in ends)
    assert len(err.splitlines()) == 1 and re.fullmatch(
        r"stopped on SIGTERM after [\d.]+ s: 2 running sequences finished, 2 ended with finish_reason "
        r"'shutdown'\n", err)
