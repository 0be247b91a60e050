"""Tokenizer and chat template, from a GGUF file's metadata or a Hugging Face directory.

BOS policy: text is always encoded without automatic special tokens; `encode_chat` renders the
model's own chat template and prepends BOS only when the model asks for one *and* the rendered
text does not already start with it. A prompt therefore never carries two BOS tokens (a bug
the public NLA code had with Llama-3 templates).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from nla_jax.errors import UserError

# llama.cpp pre-tokenizer names -> split regex (None: byte-level GPT-2 regex only).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, chat_template: str | None, bos_id: int | None,
                 eos_ids: Sequence[int], pad_id: int, add_bos: bool, special_ids: Sequence[int]):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.special_ids = frozenset(special_ids)
        self._template = None

    # -- plain text
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.tok.token_to_id(s)

    def bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            return [self.bos_id] + ids
        return ids

    # -- chat
    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this model has no chat template; pass raw text instead")
        if self._template is None:
            def raise_exception(msg):
                raise UserError(f"chat template: {msg}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos)

    def encode_chat(self, messages: Sequence[dict[str, str]] | str, add_generation_prompt: bool = True) -> list[int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.bos(self.encode(self.render_chat(messages, add_generation_prompt)))


def from_gguf_fields(fields: dict[str, Any]) -> Tokenizer:
    """Build a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre == "smollm":  # digits split one by one, then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, llama-bpe, qwen2)")
    tok.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(types) if t in (3, 4)]  # control / user-defined
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    # ChatML models end a turn with <|im_end|>; stop on it too when it is the EOS or a control token.
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(tok, chat_template=fields.get("tokenizer.chat_template"), bos_id=bos, eos_ids=eos_ids,
                     pad_id=fields.get("tokenizer.ggml.padding_token_id", eos if eos is not None else 0),
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)), special_ids=special)


def from_hf_dir(path: str, model_cfg: dict[str, Any]) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json for extra EOS ids)."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise UserError(f"{path!r} has no tokenizer.json")
    try:
        tok = HFTokenizer.from_file(tj)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise UserError(f"{tj!r} is not a readable tokenizer.json: {str(e).splitlines()[0]}") from e
    tc: dict[str, Any] = {}
    tcp = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tcp):
        with open(tcp) as f:
            tc = json.load(f)
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()

    def tid(v):
        if v is None:
            return None
        if isinstance(v, dict):
            v = v.get("content")
        return tok.token_to_id(v) if isinstance(v, str) else int(v)

    bos = model_cfg.get("bos_token_id", tid(tc.get("bos_token")))
    eos = model_cfg.get("eos_token_id", tid(tc.get("eos_token")))
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    gp = os.path.join(path, "generation_config.json")
    if os.path.isfile(gp):
        with open(gp) as f:
            ge = json.load(f).get("eos_token_id")
        for e in (ge if isinstance(ge, list) else [ge] if ge is not None else []):
            if e not in eos_ids:
                eos_ids.append(e)
    pad = tid(tc.get("pad_token"))
    add_bos = bool(tc.get("add_bos_token", False))
    # Llama-3 style: the post-processor adds BOS itself; we encode without special tokens, so
    # honour it through add_bos instead (and the template's own {{ bos_token }} is deduplicated).
    if not add_bos and bos is not None:
        try:
            add_bos = tok.post_processor is not None and bos in tok.encode("a", add_special_tokens=True).ids
        except Exception:
            add_bos = False
    specials = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    return Tokenizer(tok, chat_template=template, bos_id=bos, eos_ids=eos_ids,
                     pad_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0), add_bos=add_bos,
                     special_ids=specials)


_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level tokenizer with no merges and a ChatML template, for random test models.

    Ids: 0 <pad>, 1 <s>, 2 <|im_end|> (EOS), 3 <|im_start|>, 4..9 reserved specials, 16..271 the
    256 bytes. Lets the tiny configs run every text path (prompts, summaries, explanations) that
    the real model runs.
    """
    if vocab_size < 272:
        raise UserError(f"a byte tokenizer needs vocab_size >= 272, got {vocab_size}")
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"] + [f"<|reserved_{i}|>" for i in range(12)]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = 16 + _byte_of(ch)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return Tokenizer(tok, chat_template=_CHATML, bos_id=1, eos_ids=(2,), pad_id=0, add_bos=True,
                     special_ids=range(len(specials)))


@functools.lru_cache(maxsize=None)
def _byte_table() -> dict[str, int]:
    """GPT-2 byte-level alphabet character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))


def _byte_of(ch: str) -> int:
    return _byte_table()[ch]
