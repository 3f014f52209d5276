"""Turn a text corpus into the token files the trainer reads (nanoGPT's prepare.py scripts).

A prepared dataset is a folder holding
  train.bin  the first 90% of the token stream, np.uint16
  val.bin    the last 10%
  meta.json  {"format", "tokenizer", "vocab_size", "train_tokens", "val_tokens", "source",
              and for "char": "itos" (id -> char) and "stoi" (char -> id)}

Each file is written under a temporary name and renamed into place, meta.json
last, so a folder is a complete dataset iff meta.json exists and the .bin files
hold the token counts it records (`is_prepared`). An interrupted run leaves
the previous dataset as it was.

The scripts in data/*/prepare.py are thin command-line wrappers around
`shakespeare_main` and `text_main`; `ensure_prepared` lets `python launch.py`
prepare tiny Shakespeare on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from haiku_gpt.errors import UserError
from haiku_gpt.system import fsync_dir
from haiku_gpt.tokenizer import (
    MAX_VOCAB_SIZE,
    META_FILE,
    META_FORMAT,
    TOKENIZERS,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    one_line,
    read_meta,
)

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
# The datasets that prepare themselves: name -> tokenizer. Both are tiny Shakespeare.
BUILTIN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TRAIN_FRACTION = 0.9
SPLITS = ("train", "val")
ENCODE_CHUNK_CHARS = 1 << 20  # encode big texts piecewise so the progress bar moves


# ---------------------------------------------------------------------------
# Reading and downloading text


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a folder's *.txt files (sorted by name) joined by newlines."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"input {path} does not exist: pass --input with the path of a text file "
            f"or of a folder of .txt files.")
    files = sorted(p for p in path.glob("*.txt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise UserError(f"the folder {path} holds no .txt files: pass --input a text file, "
                        f"or a folder with .txt files in it.")
    parts = []
    for file in files:
        try:
            part = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{file} is not UTF-8 text ({one_line(e)}): convert it to UTF-8 "
                            f"(e.g. `iconv -t UTF-8`) or pass another --input.") from e
        # Files are joined so that each one starts on a line of its own.
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(part)
    text = "".join(parts)
    if not text:
        raise UserError(f"input {path} is empty: pass --input a file (or folder) with some text.")
    return text


def download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (atomically: no half-downloaded file is ever left behind)."""
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError, HTTPError, timeouts and socket errors are all OSErrors
        raise UserError(
            f"could not download {url} ({one_line(e)}): no internet? pass --input "
            f"PATH/to/input.txt with a local copy of tiny Shakespeare, e.g. "
            f"`python data/shakespeare_char/prepare.py --input PATH/to/input.txt`.") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    _commit(dest.parent, {dest.name: data})


# ---------------------------------------------------------------------------
# Tokenizing and writing


def build_tokenizer(name: str, text: str) -> Tokenizer:
    """A tokenizer for preparing `text`: a char vocabulary from it, or GPT-2's BPE."""
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        tokenizer = GPT2Tokenizer()
        tokenizer.vocab_size = tokenizer.encoding.n_vocab  # loads it now, before any work
        return tokenizer
    raise UserError(f"unknown tokenizer {name!r}: pass --tokenizer with one of {', '.join(TOKENIZERS)}.")


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters, cut only where BPE would cut anyway.

    GPT-2's pre-tokenizer never joins a newline with a following non-space
    character ("\\n" then "word" are separate pieces), so cutting right after
    such a newline gives exactly the tokens of encoding the whole text at once.
    """
    cut = re.compile(r"\n(?=\S)")
    start = 0
    while start < len(text):
        match = cut.search(text, start + size)
        end = match.end() if match else len(text)
        yield text[start:end]
        start = end


def encode_text(tokenizer: Tokenizer, text: str, chunk_chars: int = ENCODE_CHUNK_CHARS) -> np.ndarray:
    """The whole text as a uint16 token array, with a progress bar on a terminal."""
    if tokenizer.vocab_size > MAX_VOCAB_SIZE:  # impossible for char/gpt2; cheap to be sure
        raise UserError(f"vocab_size {tokenizer.vocab_size} does not fit in uint16 token files "
                        f"(at most {MAX_VOCAB_SIZE}): use --tokenizer gpt2.")
    pieces = []
    # disable=None: silent when stderr is not a terminal (CI logs, tests).
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="encoding", disable=None) as bar:
        for chunk in _chunks(text, chunk_chars):
            pieces.append(np.array(tokenizer.encode(chunk), dtype=np.uint16))
            bar.update(len(chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def prepare_text(text: str, out_dir: str | Path, tokenizer_name: str, source: str) -> dict[str, Any]:
    """Tokenize `text`, split it 90/10 and write train.bin, val.bin and meta.json to `out_dir`."""
    out_dir = Path(out_dir)
    if not text:
        raise UserError(f"input {source} is empty: pass --input a file with some text.")
    print(f"length of dataset in characters: {len(text):,}")
    tokenizer = build_tokenizer(tokenizer_name, text)
    print(f"tokenizer: {tokenizer.name}, vocab size: {tokenizer.vocab_size:,}")
    ids = encode_text(tokenizer, text)

    # nanoGPT's split: the first 90% of the stream trains, the rest validates.
    n_train = int(len(ids) * TRAIN_FRACTION)
    train, val = ids[:n_train], ids[n_train:]
    if len(train) == 0 or len(val) == 0:
        raise UserError(
            f"input {source} gives only {len(ids)} token(s), too few for both a train split "
            f"(90%) and a val split (10%): pass --input a longer text.")
    print(f"train has {len(train):,} tokens")
    print(f"val has {len(val):,} tokens")

    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "source": source,
    }
    if isinstance(tokenizer, CharTokenizer):  # the vocabulary itself, as nanoGPT's meta.pkl
        meta["itos"] = tokenizer.itos
        meta["stoi"] = tokenizer.stoi

    out_dir.mkdir(parents=True, exist_ok=True)
    _commit(out_dir, {
        "train.bin": train.tobytes(),
        "val.bin": val.tobytes(),
        # meta.json last: it is what marks the dataset complete.
        META_FILE: (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"),
    })
    print(f"wrote {out_dir / 'train.bin'}, {out_dir / 'val.bin'} and {out_dir / META_FILE}")
    return meta


def _commit(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `folder` all-or-nothing as far as a crash allows.

    Every file is first written in full to a hidden temporary name and fsynced;
    only then are they renamed into place, in order. If anything fails before
    the renames, the folder's old files are untouched. An existing meta.json is
    removed just before the renames, so the brief window in which old and new
    files are mixed reads as "not prepared", never as a wrong dataset.
    """
    staged: dict[str, Path] = {}
    try:
        for name, data in files.items():
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            staged[name] = tmp
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        if META_FILE in files:
            (folder / META_FILE).unlink(missing_ok=True)
        for name, tmp in staged.items():
            os.replace(tmp, folder / name)  # atomic on POSIX and Windows
        fsync_dir(folder)
    finally:
        for tmp in staged.values():  # after success these are already gone
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Whole datasets


def is_prepared(dataset_dir: str | Path) -> bool:
    """True iff meta.json is valid and train.bin/val.bin hold the token counts it records."""
    dataset_dir = Path(dataset_dir)
    try:
        meta = read_meta(dataset_dir)
    except UserError:
        return False
    itemsize = np.dtype(np.uint16).itemsize
    for split in SPLITS:
        path = dataset_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return False
    return True


def _already_prepared(out_dir: Path, tokenizer_name: str) -> dict[str, Any] | None:
    """The meta of a complete dataset in `out_dir` made with `tokenizer_name`, else None."""
    if not is_prepared(out_dir):
        return None
    meta = read_meta(out_dir)
    if meta["tokenizer"] != tokenizer_name:
        raise UserError(
            f"{out_dir} already holds a dataset prepared with the {meta['tokenizer']} tokenizer, "
            f"not {tokenizer_name}: pass --force to replace it, or choose another --out_dir.")
    print(f"{out_dir} is already prepared ({meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens); pass --force to prepare it again.")
    return meta


def prepare_shakespeare(out_dir: str | Path, tokenizer_name: str, input_path: str | Path | None = None,
                        force: bool = False) -> dict[str, Any]:
    """Tiny Shakespeare in `out_dir`, from `input_path`, else out_dir/input.txt, else downloaded."""
    out_dir = Path(out_dir)
    if not force and (meta := _already_prepared(out_dir, tokenizer_name)) is not None:
        return meta
    if input_path is not None:
        source = str(Path(input_path).resolve())
        text = read_text(input_path)
    else:
        local = out_dir / "input.txt"
        source = str(local.resolve())
        if not local.exists():
            download(TINY_SHAKESPEARE_URL, local)
            source = TINY_SHAKESPEARE_URL
        text = read_text(local)
    return prepare_text(text, out_dir, tokenizer_name, source)


def prepare_corpus(input_path: str | Path, out_dir: str | Path, tokenizer_name: str,
                   force: bool = False) -> dict[str, Any]:
    """A user's own text file (or folder of .txt files) as a dataset in `out_dir`."""
    out_dir = Path(out_dir)
    if not force and (meta := _already_prepared(out_dir, tokenizer_name)) is not None:
        return meta
    text = read_text(input_path)
    return prepare_text(text, out_dir, tokenizer_name, str(Path(input_path).resolve()))


def ensure_prepared(dataset_dir: str, name: str) -> None:
    """Make sure `dataset_dir` holds a dataset, preparing tiny Shakespeare on first use.

    This is what lets a newcomer run `python launch.py` with no other step.
    """
    if is_prepared(dataset_dir):
        return
    if name in BUILTIN_DATASETS:
        print(f"dataset {name!r} is not prepared yet; preparing it in {dataset_dir} (once)")
        prepare_shakespeare(dataset_dir, BUILTIN_DATASETS[name], force=True)
        return
    script = Path(dataset_dir) / "prepare.py"
    command = (f"python {script}" if script.is_file()
               else f"python data/text/prepare.py --input PATH/to/text --name {name}")
    raise UserError(f"dataset {name!r} is not prepared in {dataset_dir}: run `{command}` first "
                    f"(or pick another dataset with --config.dataset).")


# ---------------------------------------------------------------------------
# Command lines of data/*/prepare.py


def _run(work: Callable[[], object]) -> int:
    """Exit status for a script: 0, or 2 with the UserError's paragraph and no traceback."""
    try:
        work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def shakespeare_main(tokenizer_name: str, default_out_dir: str | Path,
                     argv: list[str] | None = None) -> int:
    """`python data/shakespeare{_char,}/prepare.py [--input PATH] [--out_dir DIR] [--force]`."""
    parser = argparse.ArgumentParser(
        description=f"Prepare tiny Shakespeare with the {tokenizer_name} tokenizer: "
                    f"train.bin, val.bin and meta.json in --out_dir.")
    parser.add_argument("--input", help="a local copy of tiny Shakespeare's input.txt "
                        "(default: OUT_DIR/input.txt, downloaded if missing)")
    parser.add_argument("--out_dir", default=str(default_out_dir),
                        help="where to write the dataset (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    args = parser.parse_args(argv)
    return _run(lambda: prepare_shakespeare(args.out_dir, tokenizer_name, args.input, args.force))


def text_main(data_root: str | Path, argv: list[str] | None = None) -> int:
    """`python data/text/prepare.py --input FILE_OR_DIR [--tokenizer char|gpt2] [--name NAME]`."""
    parser = argparse.ArgumentParser(
        description="Prepare your own text (a file, or a folder of .txt files) as a dataset: "
                    "train.bin, val.bin and meta.json in data/NAME/. Train on it with "
                    "--config.dataset=NAME.")
    parser.add_argument("--input", required=True, help="a UTF-8 text file, or a folder of .txt files")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                        help="char: one token per character; gpt2: GPT-2's BPE (default: %(default)s)")
    parser.add_argument("--name", help="the dataset's name (default: the input's name without extension)")
    parser.add_argument("--out_dir", help="where to write the dataset (default: data/NAME)")
    parser.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    args = parser.parse_args(argv)

    def work() -> None:
        name = args.name if args.name is not None else Path(args.input).resolve().stem
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise UserError(f"dataset name {name!r} is not a plain folder name: pass --name with "
                            f"letters, digits, '_', '-' or '.' (e.g. --name my_corpus).")
        if args.out_dir is None:
            prepare_corpus(args.input, Path(data_root) / name, args.tokenizer, args.force)
            print(f"train on it with --config.dataset={name}")
        else:
            prepare_corpus(args.input, args.out_dir, args.tokenizer, args.force)

    return _run(work)
