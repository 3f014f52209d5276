"""Text <-> token ids, rebuilt from a prepared dataset's meta.json.

Two tokenizers, as in nanoGPT:
  "char": one token per character; the vocabulary is the sorted set of
          characters of the training text, stored in meta.json (itos/stoi).
  "gpt2": GPT-2's byte-pair encoding from tiktoken (50257 tokens). tiktoken
          downloads its BPE files once and caches them; offline, point
          TIKTOKEN_CACHE_DIR at a folder holding that cache.

The trainer and the sampler only ever call `read_meta` and `load_tokenizer`,
so a checkpoint's dataset alone decides how prompts are encoded.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from haiku_gpt.errors import UserError

META_FILE = "meta.json"
META_FORMAT = 1  # bump when meta.json's meaning changes
TOKENIZERS = ("char", "gpt2")
GPT2_VOCAB_SIZE = 50257
GPT2_END_OF_TEXT = 50256  # <|endoftext|>: the prepare scripts write it after each document of a GPT-2 BPE dataset
# Token files hold uint16 ids while the vocabulary fits (GPT-2's does), else uint32. meta.json
# records which as "dtype"; a meta.json without it is from before uint32 and means uint16.
TOKEN_DTYPES = ("uint16", "uint32")
UINT16_VOCAB_SIZE = 2**16


class Tokenizer(ABC):
    """What the trainer and the sampler need: a name, a vocabulary size, and both directions."""

    name: str
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (numpy integers are fine)."""


class CharTokenizer(Tokenizer):
    """One token per character; token id = the character's index in `itos`."""

    name = "char"

    def __init__(self, itos: Sequence[str]) -> None:
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """nanoGPT's vocabulary: every character that occurs in `text`, sorted."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            pass
        # Only on failure: collect every unknown character so the message lists them all.
        missing = sorted(set(text) - self.stoi.keys())
        shown = ", ".join(repr(ch) for ch in missing[:20])
        if len(missing) > 20:
            shown += f", ... ({len(missing)} in all)"
        raise UserError(
            f"the text contains characters that are not in the char-level vocabulary: {shown}. "
            f"A char-level vocabulary comes from the training text ({self.vocab_size} characters "
            f"here), so use a prompt made of its characters (e.g. change --config.sample.start), "
            f"or train on a dataset prepared with --tokenizer gpt2, which can encode any text.")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[int(i)] for i in ids)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE via tiktoken, loaded on first use (loading may need the network)."""

    name = "gpt2"

    def __init__(self, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
        self.vocab_size = vocab_size
        self._encoding: Any = None

    @property
    def encoding(self) -> Any:
        """The `tiktoken.Encoding`; raises UserError when its files can't be had."""
        if self._encoding is None:
            self._encoding = load_gpt2_encoding()
        return self._encoding

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: text is data, so "<|endoftext|>" in it is plain text, not a special token.
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        # tiktoken replaces a cut-off UTF-8 sequence with U+FFFD instead of raising.
        return self.encoding.decode([int(i) for i in ids])


def document_separator(meta: dict[str, Any]) -> int | None:
    """The token id that ends each document of a prepared dataset, where it is a token of its own: GPT-2's
    <|endoftext|> (text is encoded with encode_ordinary, so it never comes from the text itself). None for a
    character-level dataset, whose separator is a newline (and none after a document that ends with one)."""
    return GPT2_END_OF_TEXT if meta.get("tokenizer") == "gpt2" else None


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, short enough to quote inside a UserError."""
    lines = str(error).strip().splitlines()
    summary = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return summary if len(summary) <= limit else summary[:limit - 3] + "..."


def load_gpt2_encoding() -> Any:
    """tiktoken's "gpt2" encoding, or a UserError saying how to get it offline."""
    try:
        import tiktoken

        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # ImportError, network errors from requests, bad cache files, ...
        raise UserError(
            "could not load GPT-2's BPE files (no internet?): download them once with internet, "
            "or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files "
            f"(error: {one_line(e)})") from e


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype of the token files for a vocabulary: uint16, or uint32 beyond 65536 ids."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_SIZE else np.uint32)


def meta_dtype(meta: dict[str, Any]) -> np.dtype:
    """The dtype of a prepared dataset's train.bin/val.bin (see TOKEN_DTYPES)."""
    return np.dtype(meta.get("dtype", "uint16"))


def load_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a dataset was prepared with, from its meta.json (see `read_meta`)."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["itos"])
    if kind == "gpt2":
        return GPT2Tokenizer(meta.get("vocab_size", GPT2_VOCAB_SIZE))
    raise UserError(
        f"meta.json names an unknown tokenizer {kind!r} (known: {', '.join(TOKENIZERS)}): "
        f"prepare the dataset again with its prepare.py and --force.")


def read_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """Load and check `dataset_dir/meta.json`; UserError if it is missing or corrupt."""
    dataset_dir = Path(dataset_dir)
    name = dataset_dir.resolve().name
    path = dataset_dir / META_FILE
    if not path.is_file():
        raise UserError(
            f"dataset not prepared: {path} does not exist. Run `python data/{name}/prepare.py` "
            f"(or `python data/text/prepare.py --input ... --name {name}` for your own text).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        problem = _meta_problem(meta)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = one_line(e)
    if problem:
        raise UserError(
            f"{path} is corrupt or from another version of haiku_gpt ({problem}): prepare the "
            f"dataset again with `python data/{name}/prepare.py --force` (or data/text/prepare.py "
            f"with --force).")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a parsed meta.json, or None."""

    def count(value: Any) -> bool:  # bool is an int subclass; keep it out
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != META_FORMAT:
        return f"format {meta.get('format')!r}, expected {META_FORMAT}"
    if meta.get("tokenizer") not in TOKENIZERS:
        return f"unknown tokenizer {meta.get('tokenizer')!r}"
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        if not count(meta.get(key)):
            return f"{key} is {meta.get(key)!r}, expected a positive integer"
    dtype = meta.get("dtype", "uint16")
    if dtype not in TOKEN_DTYPES:
        return f"dtype {dtype!r}, expected one of {', '.join(TOKEN_DTYPES)}"
    if meta["vocab_size"] > np.iinfo(dtype).max + 1:
        return f"vocab_size {meta['vocab_size']} does not fit in {dtype} token files"
    if meta["tokenizer"] == "char":
        itos = meta.get("itos")
        if not (isinstance(itos, list) and all(isinstance(c, str) and len(c) == 1 for c in itos)):
            return "itos is not a list of single characters"
        if len(itos) != meta["vocab_size"]:
            return f"itos has {len(itos)} characters but vocab_size is {meta['vocab_size']}"
    return None
