"""
Serve a trained model over HTTP: an OpenAI-compatible API and a web page.

    python serve.py --out_dir=out-shakespeare-char-moe            # http://127.0.0.1:8000
    python serve.py --ckpt=PATH --host=0.0.0.0 --port=8080 --api_key=KEY

The checkpoint, tokenizer, device and dtype are found as in sample.py. GET / is the page (serve.html);
GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions speak what clients of vLLM
and llama.cpp's server send (the official openai package works), streaming as Server-Sent Events. One
engine thread decodes all requests together, each at its own position in the latent cache (engine.py).
A prompt is text or token ids (a list of ints, or a list of such lists), as lm-eval sends them; one longer
than the model's context is refused with a 400 that says the context, never cropped. GET /tokenizer_info,
POST /tokenize and POST /detokenize speak vLLM's tokenizer API, so that lm-eval tokenizes with the server's
own tokenizer (docs/evaluation.md). These are base models: chat messages become a play (chat_prompt), and the
reply is the next speech. An OpenAI field a base model cannot honour (suffix, best_of > n, a JSON
response_format, tools that must be called) gets a 400 naming it; fields nobody here has heard of are
ignored, as OpenAI does. A request may ask for up to --max_tokens_limit new tokens, however short the
context. With --api_key (or the SERVE_API_KEY environment variable) every /v1 call and the tokenizer API
need `Authorization: Bearer KEY`.
With --speculative the model's MTP modules draft tokens that the engine verifies, each request's own in its
own row (engine.py; it needs a checkpoint trained with --mtp_depth >= 1): the same greedy text, the same
distribution when sampling, fewer forward passes when the drafts are good; GET /health then reports how many
drafted tokens were accepted. SIGTERM (what Docker and Kubernetes send) drains: new requests get 503 with
Retry-After and /health says "draining", running requests go on for up to --drain_timeout seconds, those
still running then end with finish_reason "shutdown"; one line, exit status 0. Ctrl-C ends them all at once
the same way; a second signal stops without waiting.
"""
import asyncio
import errno
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated, Literal

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import torch

from checkpoint import load_for_generation
from common import DTYPES, autocast, fail
from configurator import at_least, between, configure, one_of
from engine import Chunk, Engine, QueueFull, Sequence, engine_threads
from generate import Sampling
from tokenizer import PromptError, encode_marked, encode_prompt

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    _missing = None
except ImportError as e:
    _missing = f"serve.py needs FastAPI and uvicorn ({e}): pip install -r requirements-extra.txt"

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-char-moe'  # the training run to serve: its best.pt, else its ckpt.pt
ckpt = ''  # a checkpoint file; overrides out_dir
host = '127.0.0.1'  # the address to listen on; 0.0.0.0 for every interface
port = 8000  # the TCP port
device = ''  # '' = cuda, else mps, else cpu; or e.g. cuda:1
dtype = 'auto'  # float32, bfloat16 or float16 autocast; auto = bf16 on GPUs, float32 on CPUs (common.pick_dtype)
max_batch = 8  # sequences decoded together in one forward pass: the rows of the KV cache
max_queue = 64  # sequences that may wait for a row; a request that would make more gets 429
max_body = 1_000_000  # the largest request body in bytes; a larger one gets 413
api_key = ''  # if set (else $SERVE_API_KEY), every /v1 call needs the header "Authorization: Bearer KEY"
speculative = False  # MTP modules draft tokens, one forward verifies them: the same text distribution, faster
drafts = 0  # with --speculative, tokens drafted a step; 0 = mtp_depth and at least 2 (the last MTP module chained)
max_tokens_limit = 4096  # the most new tokens one request may ask for (the context does not bound it)
threads = 0  # the engine's CPU threads; 0 = one fewer than the cores, at least 1 (the HTTP side's core)
drain_timeout = 20.0  # seconds that SIGTERM gives running requests to finish before it ends them
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
RULES = dict(port=between(1, 65535), max_batch=at_least(1), max_queue=at_least(0), max_body=at_least(1),
             dtype=one_of(*DTYPES), max_tokens_limit=at_least(1), drain_timeout=at_least(0), threads=at_least(0),
             drafts=at_least(0))
if _missing:  # --help still answers without the extras; anything else stops here
    if {'-h', '--help'} & set(sys.argv[1:]):
        configure(DEFAULTS, ['--help'], f"{__doc__}\n{_missing}", [__file__], RULES)
    fail(_missing)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')  # the one file served


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    def response(self):
        kind = {401: 'authentication_error', 404: 'not_found_error', 429: 'rate_limit_error',
                503: 'service_unavailable'}.get(
            self.status, 'invalid_request_error' if self.status < 500 else 'server_error')
        body = {'error': {'message': str(self), 'type': kind, 'param': self.param, 'code': self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class Params(BaseModel):
    """What completions and chat share. Types are strict ("10" is no number, true no 1); null is the default."""
    model_config = ConfigDict(strict=True, extra='ignore')
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # not OpenAI's, but vLLM's and llama.cpp's
    seed: int | None = Field(None, ge=0, lt=2 ** 64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Bias] = Field(default_factory=dict)  # {"token id": -100..100}
    # what a base model cannot honour: refused by refuse_what_cannot_be_honoured unless asked for harmlessly
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None

    @model_validator(mode='before')
    @classmethod
    def nulls_are_defaults(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class CompletionRequest(Params):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one prompt or several
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra='ignore')
    role: Literal['system', 'user', 'assistant']
    content: str


class ChatRequest(Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize, as lm-eval's remote tokenizer sends it."""
    model_config = ConfigDict(strict=True, extra='ignore')
    prompt: str
    add_special_tokens: bool = False  # no tokenizer here adds any


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra='ignore')
    tokens: list[int]


class Mailbox:
    """Hands the engine thread's chunks to the event loop's queues: one wake-up of the loop carries every chunk
    posted before it runs (a step of 8 sequences wakes it once, not 8 times)."""

    def __init__(self, loop):
        self.loop, self.letters, self.waking = loop, deque(), False

    def post(self, queue, item):
        """From any thread: queue.put_nowait(item) on the loop."""
        self.letters.append((queue, item))
        if not self.waking:
            self.waking = True
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self):
        self.waking = False  # before emptying: a letter posted from here on schedules a delivery of its own
        while self.letters:
            queue, item = self.letters.popleft()
            queue.put_nowait(item)


def chat_prompt(messages):
    """The chat template. These are base models, trained on plain text (Shakespeare's plays for the demo),
    not on conversations, so a conversation is written as a play: each message a speech headed by its role
    in capitals, then the assistant's cue. The reply ends at the blank line before the next speech.

        SYSTEM:\\n{content}\\n\\nUSER:\\n{content}\\n\\nASSISTANT:\\n"""
    return ''.join(f"{m.role.upper()}:\n{m.content}\n\n" for m in messages) + 'ASSISTANT:\n'


async def read_json(request, limit):
    """The request's JSON body, refused with 413 past limit bytes (before reading it where the length is sent)."""
    too_large = ApiError(413, f"the request body is over the server's limit of {limit} bytes")
    if int(request.headers.get('content-length') or 0) > limit:
        raise too_large
    body = b''
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # nobody is left to answer, and nothing went wrong here: no traceback in the log
        raise ApiError(400, 'the client went away before sending the whole body')
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:100]}")


def parse(kind, data):
    """data as a kind of request, or a 400 that names the fields at fault."""
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        message = '; '.join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors[:4])
        raise ApiError(400, message, param=str(errors[0]['loc'][0]) if errors[0]['loc'] else None)


def refuse_what_cannot_be_honoured(body):
    """A 400 naming the first field of body that asks what a base model cannot do; unknown fields pass."""
    best_of = getattr(body, 'best_of', None) or body.n
    refusals = {
        'suffix': (getattr(body, 'suffix', None), "these models continue text: they cannot write towards a suffix"),
        'best_of': (best_of > body.n, f"best_of={best_of} would rank candidates by a score this server does not "
                                      f"keep: ask for n={best_of} and choose"),
        'response_format': ((body.response_format or {}).get('type', 'text') != 'text',
                            'a base model cannot promise JSON: only {"type": "text"} can be honoured'),
        'tool_choice': (body.tools and (body.tool_choice == 'required' or isinstance(body.tool_choice, dict)),
                        "a base model cannot call tools, so it cannot be made to call one"),
    }
    for field, (refused, why) in refusals.items():
        if refused:
            raise ApiError(400, f"{field}: {why}", param=field, code='unsupported_parameter')


def token_text(tok, i):
    """A token as logprobs show it: its text, or 'bytes:\\xNN...' for a token that is part of a UTF-8
    character (OpenAI's way of writing such tokens)."""
    piece = tok.token_bytes(i)
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return 'bytes:' + ''.join(f'\\x{b:02x}' for b in piece)


class Offsets:
    """The character offsets of a choice's tokens in its returned text, counted as tokenizer.Text builds it: a
    token that starts inside a character points at that character."""

    def __init__(self, tok):
        self.text = tok.text()

    def __call__(self, token):
        start = len(self.text.text)
        self.text.add(token)
        return start


def completion_logprobs(tok, entries, offsets):
    """OpenAI's (legacy completions) logprobs of entries [(id, logprob, {id: logprob} or None)]."""
    return {'tokens': [token_text(tok, t) for t, _, _ in entries],
            'token_logprobs': [lp for _, lp, _ in entries],
            'top_logprobs': [None if top is None else {token_text(tok, i): v for i, v in top.items()}
                             for _, _, top in entries],
            'text_offset': [offsets(t) for t, _, _ in entries]}


def chat_logprobs(tok, entries):
    """OpenAI's chat logprobs of entries [(id, logprob, {id: logprob})]: each token with its UTF-8 bytes."""
    def entry(i, logprob):
        return {'token': token_text(tok, i), 'logprob': logprob, 'bytes': list(tok.token_bytes(i))}
    return {'content': [{**entry(t, lp), 'top_logprobs': [entry(i, v) for i, v in top.items()]}
                        for t, lp, top in entries]}


def create_app(model, tok, meta, model_id, max_batch=8, max_queue=64, max_body=1_000_000, key='', ctx=nullcontext,
               speculative=False, max_tokens_limit=4096, threads=0, drafts=None):
    """The FastAPI app around one model; app.state.engine is its engine, closed when the app shuts down, and
    app.state.drain(timeout) stops it taking requests and ends those still running after timeout seconds;
    threads: the engine thread's CPU threads (0: torch's setting); drafts: speculative's per step (None: its default)."""
    engine = Engine(model, tok, max_batch, max_queue, ctx, speculative, threads=threads, drafts=drafts)
    context = model.cfg.block_size
    live = {}  # the sequences whose clients wait for their end: id(sequence) -> (sequence, emit)
    mailboxes = {}  # event loop -> its Mailbox

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title='nanoDeepSeek', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.draining = engine, False
    app.exception_handler(ApiError)(lambda request, e: e.response())
    app.exception_handler(HTTPException)(lambda request, e: ApiError(e.status_code, str(e.detail)).response())

    # the checks are coroutines: FastAPI runs a plain function in its thread pool, a hop there and back per request
    async def authorize(request: Request):
        expected = f"Bearer {key}".encode()
        if key and not hmac.compare_digest(request.headers.get('authorization', '').encode(), expected):
            raise ApiError(401, 'a valid API key is needed: send the header "Authorization: Bearer KEY"',
                           code='invalid_api_key')

    async def accepting():
        if app.state.draining:
            raise ApiError(503, 'this server is shutting down: send the request again to another one, or later',
                           code='shutting_down', headers={'Retry-After': '5'})

    checks = [Depends(accepting), Depends(authorize)]
    v1 = APIRouter(prefix='/v1', dependencies=checks)
    tokenizer_api = APIRouter(dependencies=checks)

    @app.get('/')
    def page():
        return FileResponse(PAGE, media_type='text/html')

    @app.get('/health')
    def health():
        running, waiting = engine.load()
        answer = {'status': 'draining' if app.state.draining else 'ok', 'running': running, 'waiting': waiting}
        if speculative:  # since start-up: drafted tokens verified, those accepted, and their ratio
            drafted, accepted = engine.drafting['drafted'], engine.drafting['accepted']
            answer['speculative'] = {'drafted': drafted, 'accepted': accepted,
                                     'acceptance_rate': accepted / drafted if drafted else None}
        return JSONResponse(answer, 503 if app.state.draining else 200)

    card = {'id': model_id, 'object': 'model', 'created': 0, 'owned_by': 'nanoDeepSeek', 'max_model_len': context}

    @v1.get('/models')
    def models():
        return {'object': 'list', 'data': [card]}

    @v1.get('/models/{name}')
    def one_model(name: str):
        check_model(name)
        return card

    def check_model(name):
        if name is not None and name != model_id:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {model_id!r}",
                           param='model', code='model_not_found')

    @tokenizer_api.get('/tokenizer_info')
    def tokenizer_info():
        return {'tokenizer_class': tok.name, 'eos_token': None if tok.eot is None else tok.decode([tok.eot]),
                'bos_token': None, 'pad_token': None, 'vocab_size': tok.vocab_size, 'model_max_length': context}

    @tokenizer_api.post('/tokenize')
    async def tokenize(request: Request):
        body = parse(TokenizeRequest, await read_json(request, max_body))
        try:
            ids = encode_marked(tok, body.prompt)
        except ValueError as e:  # a character a char model has no token for
            raise ApiError(400, str(e), param='prompt')
        return {'count': len(ids), 'max_model_len': context, 'tokens': ids, 'token_strs': None}

    @tokenizer_api.post('/detokenize')
    async def detokenize(request: Request):
        body = parse(DetokenizeRequest, await read_json(request, max_body))
        return {'prompt': tok.decode(known_ids(body.tokens, 'tokens'))}

    def known_ids(ids, param):
        outside = [t for t in ids if not 0 <= t < tok.vocab_size]
        if outside:
            raise ApiError(400, f"token id {outside[0]} is outside this model's vocabulary of {tok.vocab_size} "
                                f"tokens", param=param)
        return ids

    def encode(prompt, param):
        """A prompt's token ids (text through the tokenizer, ids as they are), or a 400: it must fit the context."""
        try:
            ids, n = encode_prompt(tok, meta, prompt if isinstance(prompt, str) else known_ids(prompt, param), context)
        except PromptError as e:
            raise ApiError(400, str(e), param=param)
        if n > context:
            raise ApiError(400, f"the prompt is {n} tokens, more than this model's context of {context} tokens: "
                                f"send at most {context}", param=param, code='context_length_exceeded')
        return ids

    def sequences(body, prompts, max_tokens, param, stop=(), **extra):
        """The engine sequences of a request, n per prompt (choice i draws from seed + i), after the checks
        that the request's types cannot make. stop: the template's own stop strings, kept whatever the
        client's stop list says."""
        check_model(body.model)
        refuse_what_cannot_be_honoured(body)
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {max_tokens_limit} new "
                                f"tokens per request (serve.py --max_tokens_limit)", param='max_tokens')
        try:
            bias = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias maps token ids (as strings) to numbers from -100 to 100",
                           param='logit_bias')
        known_ids(list(bias), 'logit_bias')
        sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, logit_bias=bias,
                            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        client_stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(client_stop) > 16 or not all(client_stop):
            raise ApiError(400, 'stop takes at most 16 strings, none of them empty', param='stop')
        if not prompts or len(prompts) * body.n > max_batch + max_queue:
            raise ApiError(400, f"a request makes 1 to {max_batch + max_queue} sequences (prompts times n), "
                                f"not {len(prompts) * body.n}", param='n' if prompts else 'prompt')
        seqs = []
        for prompt in prompts:
            ids = encode(prompt, param)
            for _ in range(body.n):
                seed = None if body.seed is None else (body.seed + len(seqs)) % 2 ** 64
                seqs.append(Sequence(ids, max_tokens, emit=None, sampling=sampling, seed=seed,
                                     stop=tuple(dict.fromkeys([*client_stop, *stop])),
                                     **extra))
        return seqs

    def run(seqs):
        """Submit seqs (429 when the queue is full) and return an async iterator of (index, Chunk) until each
        has finished. Leaving it early (a closed stream cancels it) cancels what is left."""
        loop, chunks = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = mailboxes.get(loop) or mailboxes.setdefault(loop, Mailbox(loop))
        for i, s in enumerate(seqs):
            s.emit = lambda chunk, i=i: mailbox.post(chunks, (i, chunk))
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}): try again shortly", code='queue_full',
                           headers={'Retry-After': '1'})
        live.update((id(s), (s, s.emit)) for s in seqs)

        async def results():
            ended = set()
            try:
                while len(ended) < len(seqs):
                    i, chunk = await chunks.get()
                    if i in ended:  # what the engine made of it in the step after drain() ended it
                        continue
                    if chunk.finish_reason or chunk.error:
                        ended.add(i)
                        live.pop(id(seqs[i]), None)
                    yield i, chunk
            finally:
                for s in seqs:
                    engine.cancel(s)
                    live.pop(id(s), None)
        return results()

    def drain(timeout):
        """Refuse new requests (503), give those running up to timeout seconds, then end each sequence still
        running with finish_reason 'shutdown' (its client gets that chunk, then [DONE]). Called from a thread;
        returns (sequences that finished, sequences ended)."""
        app.state.draining = True
        running, deadline = len(live), time.monotonic() + timeout
        while live and time.monotonic() < deadline:
            time.sleep(0.02)
        cut = list(live.values())
        for seq, emit in cut:
            engine.cancel(seq)
            emit(Chunk(finish_reason='shutdown'))
        return running - len(cut), len(cut)
    app.state.drain = drain

    async def respond(body, seqs, kind, piece):
        """The response, streamed (SSE chunks of kind + '.chunk' for chat, then [DONE]) or whole, with each
        choice folded together from the pieces piece(index, chunk) made of the engine's chunks."""
        results = run(seqs)
        head = {'id': f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                'object': kind, 'created': int(time.time()), 'model': model_id}
        if not body.stream:
            choices = [None] * len(seqs)
            try:
                async for i, chunk in results:
                    if chunk.error:
                        raise ApiError(500, chunk.error, code='engine_error')
                    choices[i] = merge(choices[i], piece(i, chunk))
            finally:
                await results.aclose()
            return {**head, 'choices': choices, 'usage': usage(seqs)}
        head['object'] = kind + '.chunk' if kind == 'chat.completion' else kind

        async def events():
            try:
                async for i, chunk in results:
                    if chunk.error:
                        yield sse({'error': {'message': chunk.error, 'type': 'server_error', 'param': None,
                                             'code': 'engine_error'}})
                        return
                    yield sse({**head, 'choices': [piece(i, chunk)]})
                if (body.stream_options or {}).get('include_usage'):
                    yield sse({**head, 'choices': [], 'usage': usage(seqs)})
                yield 'data: [DONE]\n\n'
            finally:
                await results.aclose()
        return StreamingResponse(events(), media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})

    @v1.post('/completions')
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request, max_body))
        one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if one else body.prompt
        seqs = sequences(body, prompts, 16 if body.max_tokens is None else body.max_tokens, 'prompt',
                         logprobs=body.logprobs, echo=body.echo)
        echoed, offsets = set(), [Offsets(tok) for _ in seqs]

        def piece(i, chunk):
            text = chunk.text
            if body.echo and i not in echoed:  # the prompt leads the choice's text
                echoed.add(i)
                text = tok.decode(seqs[i].ids) + text
            logprobs = None if body.logprobs is None else completion_logprobs(tok, chunk.logprobs, offsets[i])
            return {'index': i, 'text': text, 'logprobs': logprobs, 'finish_reason': chunk.finish_reason}
        return await respond(body, seqs, 'text_completion', piece)

    @v1.post('/chat/completions')
    async def chat(request: Request):
        body = parse(ChatRequest, await read_json(request, max_body))
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, 'top_logprobs needs logprobs: true', param='top_logprobs')
        limit = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        seqs = sequences(body, [chat_prompt(body.messages)], max_tokens_limit if limit is None else limit,
                         'messages', stop=['\n\n'], logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        started = set()

        def piece(i, chunk):
            delta = {'content': chunk.text} if i in started else {'role': 'assistant', 'content': chunk.text}
            started.add(i)
            logprobs = chat_logprobs(tok, chunk.logprobs) if body.logprobs else None
            return {'index': i, 'delta': delta, 'logprobs': logprobs, 'finish_reason': chunk.finish_reason}
        response = await respond(body, seqs, 'chat.completion', piece)
        if isinstance(response, dict):
            for choice in response['choices']:
                choice['message'] = choice.pop('delta')
        return response

    app.include_router(v1)
    app.include_router(tokenizer_api)
    return app


def sse(obj):
    """One Server-Sent Event carrying obj as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


def merge(choice, piece):
    """Fold a streamed piece of a choice into the choice so far: strings join, lists extend, dicts merge
    key by key, anything else is replaced (the finish_reason comes last)."""
    if choice is None or not isinstance(piece, (str, list, dict)):
        return piece
    if isinstance(piece, dict):
        return {**choice, **{k: merge(choice.get(k), v) for k, v in piece.items()}}
    return choice + piece


def usage(seqs):
    """OpenAI's token counts: each prompt once (the n sequences of a prompt share its ids), every new token."""
    prompt = sum(len(ids) for ids in {id(s.ids): s.ids for s in seqs}.values())
    new = sum(len(s.tokens) for s in seqs)
    return {'prompt_tokens': prompt, 'completion_tokens': new, 'total_tokens': prompt + new}


def build(argv):
    """(the app, the options, a line saying what it serves) for the command line argv."""
    c, _ = configure(DEFAULTS, argv, __doc__, [__file__], RULES)
    # only the engine thread runs parallel ops: a second thread's OpenMP team (this one's, from loading the model)
    # puts more threads than cores in the process, and libgomp then barely spins before its threads sleep: a step
    # 2-3x slower (docs/serving.md)
    threads = c['threads'] or engine_threads()
    torch.set_num_threads(1)
    path, model, _, tok, meta, dev, dt = load_for_generation(c, 'serve')
    model_id = os.path.basename(os.path.dirname(os.path.abspath(path)))
    key = c['api_key'] or os.environ.get('SERVE_API_KEY', '')
    app = create_app(model, tok, meta, model_id, c['max_batch'], c['max_queue'], c['max_body'], key,
                     lambda: autocast(dev, dt), c['speculative'], c['max_tokens_limit'], threads, c['drafts'] or None)
    drafts = f", speculative: {c['drafts']} MTP drafts per step" if c['speculative'] else ''
    what = (f"{path} as model {model_id!r} ({model.num_params() / 1e6:.2f}M parameters, tokenizer "
            f"{meta.get('tokenizer')}, context {model.cfg.block_size}, {dev} {dt}, {threads} CPU "
            f"threads, batches of up to "
            f"{c['max_batch']}{drafts}{', API key required' if key else ''})")
    return app, c, what


def listen(host, port):
    """A socket listening on host:port, or one line saying why there is none and what to do."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        return sock
    except OSError as e:
        advice = {errno.EADDRINUSE: f"another program (another serve.py?) is listening there: stop it, or pick "
                                    f"another port with --port={port + 1 if port < 65535 else 8000}",
                  errno.EACCES: "ports below 1024 need privileges: pick one above, e.g. --port=8000",
                  errno.EADDRNOTAVAIL: "this machine has no such address: try --host=127.0.0.1 or 0.0.0.0"}
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}; "
             f"{advice.get(e.errno, 'check --host and --port')}")


def serve_until_stopped(app, sock, drain_timeout):
    """Serve app on the listening sock until SIGTERM (which drains for up to drain_timeout seconds) or
    Ctrl-C (which ends the running requests at once); a second signal stops without waiting. Returns the line
    that says how it stopped."""
    import uvicorn
    stopping = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's own would raise the signal again at the end: exit 143
            if stopping:
                self.should_exit = self.force_exit = True
                return
            stopping.append(signal.Signals(sig).name)
            threading.Thread(target=self.drain, args=(drain_timeout if sig == signal.SIGTERM else 0,)).start()

        def drain(self, timeout):
            t0 = time.monotonic()
            finished, cut = app.state.drain(timeout)
            what = (f" after {time.monotonic() - t0:.1f} s: {finished} running sequences finished, {cut} ended "
                    f"with finish_reason 'shutdown'") if finished + cut else ''
            stopping.append(f"stopped on {stopping[0]}{what}")
            self.should_exit = True

    Server(uvicorn.Config(app, log_level='warning', timeout_graceful_shutdown=5)).run(sockets=[sock])
    return stopping[-1] if len(stopping) > 1 else 'stopped'


def start_in_thread(app, host='127.0.0.1'):
    """Serve app on a free port of host from a background thread, for tests and benchmarks: (base URL, stop)."""
    import uvicorn
    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level='warning', timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join()
        sock.close()
    return f"http://{host}:{sock.getsockname()[1]}", stop


def main(argv=None):
    # the engine thread lets go of the GIL in every torch op and waits to win it back when the op ends; the HTTP
    # thread, busy with the chunks of many streams, may keep it for Python's switch interval (5 ms by default):
    # 1 ms gives it back sooner (BENCHMARKS.md, section 7)
    sys.setswitchinterval(0.001)
    app, c, what = build(sys.argv[1:] if argv is None else argv)
    sock = listen(c['host'], c['port'])
    print(f"serving {what} at http://{c['host']}:{c['port']}: the page at /, the OpenAI API at /v1 "
          f"(Ctrl-C stops, SIGTERM drains)", file=sys.stderr, flush=True)
    print(serve_until_stopped(app, sock, c['drain_timeout']), file=sys.stderr)


if __name__ == "__main__":
    main()
