"""
Serve a trained model over HTTP: an OpenAI-compatible API and a web page.

    python serve.py --out_dir=out-shakespeare-char-moe            # http://127.0.0.1:8000
    python serve.py --ckpt=PATH --host=0.0.0.0 --port=8080 --api_key=KEY

The checkpoint, tokenizer, device and dtype are found as in sample.py. GET / is the page (serve.html);
GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions speak what clients of vLLM
and llama.cpp's server send (the official openai package works), streaming as Server-Sent Events. One
engine thread decodes all requests together, each at its own position in the latent cache (engine.py).
These are base models: chat messages become a play (chat_prompt), and the reply is the next speech. Other
OpenAI fields (penalties, best_of, ...) are accepted and ignored. With
--api_key (or the SERVE_API_KEY environment variable) every /v1 call needs `Authorization: Bearer KEY`.
With --speculative the model's MTP modules draft tokens that the engine verifies, each request's own in its
own row (engine.py; it needs a checkpoint trained with --mtp_depth >= 1): the same greedy text, the same
distribution when sampling, fewer forward passes when the drafts are good; GET /health then reports how many
drafted tokens were accepted. Ctrl-C stops it.
"""
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager, nullcontext
from typing import Literal

from checkpoint import load_for_generation
from common import DTYPES, autocast, fail
from configurator import at_least, between, configure, one_of
from engine import Engine, QueueFull, Sequence
from generate import Sampling
from tokenizer import PromptError, encode_prompt

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
    from starlette.exceptions import HTTPException
except ImportError as e:
    fail(f"serve.py needs FastAPI and uvicorn ({e}): pip install -r requirements-extra.txt")

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-char-moe'  # the training run to serve: its best.pt, else its ckpt.pt
ckpt = ''  # a checkpoint file; overrides out_dir
host = '127.0.0.1'  # the address to listen on; 0.0.0.0 for every interface
port = 8000  # the TCP port
device = ''  # '' = cuda, else mps, else cpu; or e.g. cuda:1
dtype = 'auto'  # float32, bfloat16 or float16 autocast; auto = bf16 where the device has it (common.pick_dtype)
max_batch = 8  # sequences decoded together in one forward pass: the rows of the KV cache
max_queue = 64  # sequences that may wait for a row; a request that would make more gets 429
max_body = 1_000_000  # the largest request body in bytes; a larger one gets 413
api_key = ''  # if set (else $SERVE_API_KEY), every /v1 call needs the header "Authorization: Bearer KEY"
speculative = False  # MTP modules draft tokens, one forward verifies them: the same text distribution, faster
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
RULES = dict(port=between(1, 65535), max_batch=at_least(1), max_queue=at_least(0), max_body=at_least(1),
             dtype=one_of(*DTYPES))
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')  # the one file served


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    def response(self):
        kind = {401: 'authentication_error', 404: 'not_found_error', 429: 'rate_limit_error'}.get(
            self.status, 'invalid_request_error' if self.status < 500 else 'server_error')
        body = {'error': {'message': str(self), 'type': kind, 'param': self.param, 'code': self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


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

    @model_validator(mode='before')
    @classmethod
    def nulls_are_defaults(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class CompletionRequest(Params):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra='ignore')
    role: Literal['system', 'user', 'assistant']
    content: str


class ChatRequest(Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens


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
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
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


def logprobs_json(tok, entries, offset):
    """OpenAI's (legacy completions) logprobs of entries [(id, logprob, {id: logprob})], text offsets from
    offset; and the offset after them."""
    tokens, offsets = [tok.decode([t]) for t, _, _ in entries], []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {'tokens': tokens, 'token_logprobs': [lp for _, lp, _ in entries],
            'top_logprobs': [None if top is None else {tok.decode([i]): v for i, v in top.items()}
                             for _, _, top in entries],
            'text_offset': offsets}, offset


def create_app(model, tok, meta, model_id, max_batch=8, max_queue=64, max_body=1_000_000, key='', ctx=nullcontext,
               speculative=False):
    """The FastAPI app around one model; app.state.engine is its engine, closed when the app shuts down."""
    engine = Engine(model, tok, max_batch, max_queue, ctx, speculative)
    context = model.cfg.block_size

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title='nanoDeepSeek', lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.exception_handler(ApiError)(lambda request, e: e.response())
    app.exception_handler(HTTPException)(lambda request, e: ApiError(e.status_code, str(e.detail)).response())

    def authorize(request: Request):
        expected = f"Bearer {key}".encode()
        if key and not hmac.compare_digest(request.headers.get('authorization', '').encode(), expected):
            raise ApiError(401, 'a valid API key is needed: send the header "Authorization: Bearer KEY"',
                           code='invalid_api_key')

    v1 = APIRouter(prefix='/v1', dependencies=[Depends(authorize)])

    @app.get('/')
    def page():
        return FileResponse(PAGE, media_type='text/html')

    @app.get('/health')
    def health():
        running, waiting = engine.load()
        answer = {'status': 'ok', 'running': running, 'waiting': waiting}
        if speculative:  # since start-up: drafted tokens verified, those accepted, and their ratio
            drafted, accepted = engine.drafting['drafted'], engine.drafting['accepted']
            answer['speculative'] = {'drafted': drafted, 'accepted': accepted,
                                     'acceptance_rate': accepted / drafted if drafted else None}
        return answer

    @v1.get('/models')
    def models():
        return {'object': 'list', 'data': [{'id': model_id, 'object': 'model', 'created': 0,
                                            'owned_by': 'nanoDeepSeek', 'max_model_len': context}]}

    def sequences(body, prompts, max_tokens, param, stop=(), **extra):
        """The engine sequences of a request, n per prompt (choice i draws from seed + i), after the checks
        that the request's types cannot make."""
        if body.model is not None and body.model != model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist: this server serves {model_id!r}",
                           param='model', code='model_not_found')
        if max_tokens > context:
            raise ApiError(400, f"max_tokens={max_tokens} is more than this model can produce: its context is "
                                f"{context} tokens", param='max_tokens')
        stop = [body.stop] if isinstance(body.stop, str) else body.stop if body.stop is not None else list(stop)
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, 'stop takes at most 4 strings, none of them empty', param='stop')
        if not prompts or len(prompts) * body.n > max_batch + max_queue:
            raise ApiError(400, f"a request makes 1 to {max_batch + max_queue} sequences (prompts times n), "
                                f"not {len(prompts) * body.n}", param='n' if prompts else 'prompt')
        seqs = []
        for text in prompts:
            try:
                ids, _ = encode_prompt(tok, meta, text, context)
            except PromptError as e:
                raise ApiError(400, str(e), param=param)
            for _ in range(body.n):
                seed = None if body.seed is None else (body.seed + len(seqs)) % 2 ** 64
                sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
                seqs.append(Sequence(ids, max_tokens, emit=None, sampling=sampling, seed=seed, stop=tuple(stop),
                                     **extra))
        return seqs

    def run(seqs):
        """Submit seqs (429 when the queue is full) and return an async iterator of (index, Chunk) until each
        has finished. Leaving it early (a closed stream cancels it) cancels what is left."""
        loop, chunks = asyncio.get_running_loop(), asyncio.Queue()
        for i, s in enumerate(seqs):
            s.emit = lambda chunk, i=i: loop.call_soon_threadsafe(chunks.put_nowait, (i, chunk))
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}): try again shortly", code='queue_full',
                           headers={'Retry-After': '1'})

        async def results():
            left = len(seqs)
            try:
                while left:
                    i, chunk = await chunks.get()
                    left -= bool(chunk.finish_reason or chunk.error)
                    yield i, chunk
            finally:
                for s in seqs:
                    engine.cancel(s)
        return results()

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
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        seqs = sequences(body, prompts, 16 if body.max_tokens is None else body.max_tokens, 'prompt',
                         logprobs=body.logprobs, echo=body.echo)
        echoed, offsets = set(), [0] * len(seqs)

        def piece(i, chunk):
            text = chunk.text
            if body.echo and i not in echoed:  # the prompt (as cropped) leads the choice's text
                echoed.add(i)
                text = tok.decode(seqs[i].ids) + text
            logprobs = None
            if body.logprobs is not None:
                logprobs, offsets[i] = logprobs_json(tok, chunk.logprobs, offsets[i])
            return {'index': i, 'text': text, 'logprobs': logprobs, 'finish_reason': chunk.finish_reason}
        return await respond(body, seqs, 'text_completion', piece)

    @v1.post('/chat/completions')
    async def chat(request: Request):
        body = parse(ChatRequest, await read_json(request, max_body))
        limit = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        seqs = sequences(body, [chat_prompt(body.messages)], context if limit is None else limit, 'messages',
                         stop=['\n\n'])
        started = set()

        def piece(i, chunk):
            delta = {'content': chunk.text} if i in started else {'role': 'assistant', 'content': chunk.text}
            started.add(i)
            return {'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': chunk.finish_reason}
        response = await respond(body, seqs, 'chat.completion', piece)
        if isinstance(response, dict):
            for choice in response['choices']:
                choice['message'] = choice.pop('delta')
        return response

    app.include_router(v1)
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
    path, model, _, tok, meta, dev, dt = load_for_generation(c, 'serve')
    model_id = os.path.basename(os.path.dirname(os.path.abspath(path)))
    key = c['api_key'] or os.environ.get('SERVE_API_KEY', '')
    app = create_app(model, tok, meta, model_id, c['max_batch'], c['max_queue'], c['max_body'], key,
                     lambda: autocast(dev, dt), c['speculative'])
    drafts = f", speculative: {model.cfg.mtp_depth} MTP drafts per step" if c['speculative'] else ''
    what = (f"{path} as model {model_id!r} ({model.num_params() / 1e6:.2f}M parameters, tokenizer "
            f"{meta.get('tokenizer')}, context {model.cfg.block_size}, {dev} {dt}, batches of up to "
            f"{c['max_batch']}{drafts}{', API key required' if key else ''})")
    return app, c, what


def start_in_thread(app, host='127.0.0.1'):
    """Serve app on a free port of host from a background thread, for tests and benchmarks: (base URL, stop)."""
    import socket
    import threading
    import uvicorn
    sock = socket.socket()
    sock.bind((host, 0))
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
    import uvicorn
    app, c, what = build(sys.argv[1:] if argv is None else argv)
    print(f"serving {what} at http://{c['host']}:{c['port']}: the page at /, the OpenAI API at /v1 "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=c['host'], port=c['port'], log_level='warning', timeout_graceful_shutdown=1)
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again
        pass
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
