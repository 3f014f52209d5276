"""Turn a corpus into the token files the trainer reads (nanoGPT's prepare.py scripts), streaming.

A prepared dataset is a folder holding
  train.bin  the training tokens: uint16, or uint32 when the vocabulary has more than 65536 ids
  val.bin    the validation tokens, the same dtype
  meta.json  {"format", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens",
              "split", "documents", "source", and for "char": "itos" (id -> char) and "stoi"}

The corpus (haiku_gpt/corpus.py: .txt, .jsonl, .parquet files, folders of them, or a
Hugging Face dataset) is read as a stream of documents in pieces, tokenized by `workers`
processes a batch at a time with a bounded number of batches in flight, and appended to
the token files as the batches come back, in order: memory stays flat however large the
corpus. The output depends only on the corpus and the settings, never on the number of
workers.

How the corpus becomes train and val:
  one document (a single .txt file)  tokenized as it is, then split by position: the first
      90% of the tokens train and the rest validates (nanoGPT's split; --val_fraction).
  several documents  each is followed by a separator (GPT-2's <|endoftext|> for BPE; for
      char-level a newline, unless it already ends with one) and goes whole to val or to
      train: to val when a hash of its index falls below --val_fraction
      (`is_val_document`), so no document is cut across the two.
A char-level vocabulary is every character of the corpus, which takes a first pass over it.

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
import collections
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from tqdm import tqdm

from haiku_gpt.corpus import DEFAULT_FIELD, Corpus, Piece, files_corpus, hf_corpus, text_corpus, txt_corpus
from haiku_gpt.errors import UserError
from haiku_gpt.system import fsync_dir
from haiku_gpt.tokenizer import (
    META_FILE,
    META_FORMAT,
    TOKENIZERS,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_gpt2_encoding,
    meta_dtype,
    one_line,
    read_meta,
    token_dtype,
)

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
# The datasets that prepare themselves: name -> tokenizer. Both are tiny Shakespeare.
BUILTIN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
VAL_FRACTION = 0.1
SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # characters of text a worker encodes at a time
IN_FLIGHT_PER_WORKER = 2  # batches sent ahead to each worker: bounds the memory of the text in flight
COPY_BYTES = 16 << 20


# ---------------------------------------------------------------------------
# Downloading


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
# Tokenizing: the vocabulary, and pieces -> token ids in worker processes


def char_vocabulary(corpus: Corpus) -> list[str]:
    """Every character of the corpus, sorted (nanoGPT's vocabulary), from a first pass over it.

    With separators (more than one document) a newline is included when some document
    does not end with one, as `PieceEncoder` then adds it."""
    seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
    with tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="vocabulary", disable=None) as bar:
        for piece in corpus.pieces():
            seen[_code_points(piece.text)] = True
            if piece.last and not corpus.single_document and not piece.text.endswith("\n"):
                seen[ord("\n")] = True
            bar.update(piece.nbytes)
    return [chr(c) for c in np.flatnonzero(seen)]


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def build_tokenizer(name: str, corpus: Corpus) -> Tokenizer:
    """A tokenizer for preparing `corpus`: a char vocabulary from it, or GPT-2's BPE."""
    if name == "char":
        return CharTokenizer(char_vocabulary(corpus))
    if name == "gpt2":
        tokenizer = GPT2Tokenizer()
        tokenizer.vocab_size = tokenizer.encoding.n_vocab  # loads it now, before any work
        return tokenizer
    raise UserError(f"unknown tokenizer {name!r}: pass --tokenizer with one of {', '.join(TOKENIZERS)}.")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to encode pieces: small, and sent once to each worker process."""

    tokenizer: str  # "char" or "gpt2"
    itos: tuple[str, ...]  # the char vocabulary; empty for gpt2
    separate: bool  # follow each document with a separator
    dtype: str  # of the token files

    @classmethod
    def of(cls, tokenizer: Tokenizer, corpus: Corpus) -> EncoderSpec:
        itos = tuple(tokenizer.itos) if isinstance(tokenizer, CharTokenizer) else ()
        return cls(tokenizer.name, itos, not corpus.single_document, token_dtype(tokenizer.vocab_size).name)


class PieceEncoder:
    """Pieces -> token ids: GPT-2's BPE (tiktoken), or a lookup table from code point to char id."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        if spec.tokenizer == "gpt2":
            encoding = load_gpt2_encoding()
            self.encode = lambda text: np.array(encoding.encode_ordinary(text), dtype=spec.dtype)
            self.end = [encoding.eot_token]  # <|endoftext|>, 50256
        else:
            self.table = np.full(max(map(ord, spec.itos), default=0) + 1, -1, dtype=np.int64)
            self.table[[ord(ch) for ch in spec.itos]] = np.arange(len(spec.itos))
            self.encode = self._encode_chars
            self.end = [spec.itos.index("\n")] if "\n" in spec.itos else []  # see char_vocabulary

    def _encode_chars(self, text: str) -> np.ndarray:
        points = _code_points(text)
        ids = self.table[np.minimum(points, len(self.table) - 1)]
        if (ids < 0).any() or (points >= len(self.table)).any():
            raise UserError("the corpus has characters that its first pass did not see: did it change "
                            "while being prepared? Prepare it again once it no longer changes.")
        return ids.astype(self.spec.dtype)

    def separator(self, text: str) -> list[int]:
        """What follows the last piece `text` of a document when documents are separated:
        <|endoftext|>, or for char-level a newline unless the document ends with one."""
        return [] if self.spec.tokenizer == "char" and text.endswith("\n") else self.end

    def __call__(self, items: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """The tokens of all pieces, concatenated, and how many of them each piece has."""
        arrays = []
        for text, last in items:
            ids = self.encode(text)
            if last and self.spec.separate:
                ids = np.append(ids, np.array(self.separator(text), dtype=self.spec.dtype))
            arrays.append(ids)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        return (np.concatenate(arrays) if arrays else np.zeros(0, self.spec.dtype)), lengths


# The encoder of a worker process, made once by _start_worker (or why it could not be made).
_worker_encoder: PieceEncoder | Exception | None = None


def _start_worker(spec: EncoderSpec) -> None:
    global _worker_encoder
    try:
        _worker_encoder = PieceEncoder(spec)
    except Exception as e:  # reported with the first batch, where the main process sees it
        _worker_encoder = e


def _encode_in_worker(items: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(_worker_encoder, Exception):
        raise _worker_encoder
    assert _worker_encoder is not None
    return _worker_encoder(items)


class Batch(NamedTuple):
    """Consecutive pieces encoded together, with the index of each one's document."""

    items: list[tuple[str, bool]]  # (text, last piece of its document)
    docs: np.ndarray  # int64 document index of each piece
    last: np.ndarray  # bool: the piece ends its document
    nbytes: int  # input bytes the pieces used (the progress bar's unit)


def batches(pieces: Iterator[Piece]) -> Iterator[Batch]:
    """Pieces grouped into batches of about BATCH_CHARS characters; documents are numbered from 0."""
    items: list[tuple[str, bool]] = []
    docs: list[int] = []
    chars = nbytes = doc = 0
    for piece in pieces:
        items.append((piece.text, piece.last))
        docs.append(doc)
        chars, nbytes, doc = chars + len(piece.text), nbytes + piece.nbytes, doc + piece.last
        if chars >= BATCH_CHARS:
            yield Batch(items, np.array(docs, np.int64), np.array([last for _, last in items], bool), nbytes)
            items, docs, chars, nbytes = [], [], 0, 0
    if items or nbytes:
        yield Batch(items, np.array(docs, np.int64), np.array([last for _, last in items], bool), nbytes)


def encoded(stream: Iterator[Batch], spec: EncoderSpec,
            workers: int) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
    """(batch, tokens, tokens per piece) for each batch, in order, encoded by `workers` processes.

    At most IN_FLIGHT_PER_WORKER batches per worker are sent ahead, so the text held in memory
    is bounded whatever the corpus size. workers=1, or a corpus of a single batch, is encoded
    in this process (starting workers would take longer than the work).
    """
    stream = iter(stream)
    head = list(itertools.islice(stream, 2))
    if workers <= 1 or len(head) < 2:
        encoder = PieceEncoder(spec)
        for batch in itertools.chain(head, stream):
            yield batch, *encoder(batch.items)
        return
    # spawn: a fresh interpreter, safe whatever threads this process runs (pyarrow's, tqdm's);
    # a worker that dies (out of memory) raises BrokenProcessPool here instead of hanging.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start_worker, (spec,)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in itertools.chain(head, stream):
                pending.append((batch, pool.submit(_encode_in_worker, batch.items)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    done, future = pending.popleft()
                    yield done, *future.result()
            while pending:
                done, future = pending.popleft()
                yield done, *future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


# ---------------------------------------------------------------------------
# Splitting and writing


def is_val_document(index: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each document index goes to val: its splitmix64 hash, as a fraction of 2**64, is below
    `val_fraction`. Fixed per index (not per worker or batch), and spread evenly over the corpus."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) < val_fraction * 2.0**53


class _Staging:
    """Files written under hidden temporary names in a folder, renamed into place by `commit`.

    Until `commit`, the folder's files are untouched; whatever happens before it (an error,
    ^C) the temporary files are removed on leaving the `with`. `commit` fsyncs each file,
    removes an existing meta.json, and renames the files in the order they were created
    (meta.json last), so the brief window in which old and new files are mixed reads as
    "not prepared", never as a wrong dataset.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, tuple[Path, BinaryIO]] = {}

    def create(self, name: str) -> BinaryIO:
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        file = open(tmp, "w+b")  # noqa: SIM115 (closed by commit or __exit__)
        self.files[name] = (tmp, file)
        return file

    def commit(self) -> None:
        for _, file in self.files.values():
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            file.close()
        if META_FILE in self.files:
            (self.folder / META_FILE).unlink(missing_ok=True)
        for name, (tmp, _) in self.files.items():
            os.replace(tmp, self.folder / name)  # atomic on POSIX and Windows
        fsync_dir(self.folder)

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, file in self.files.values():  # after a commit these are closed and gone
            file.close()
            tmp.unlink(missing_ok=True)


def _commit(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `folder` all-or-nothing as far as a crash allows (see _Staging)."""
    with _Staging(folder) as staging:
        for name, data in files.items():
            staging.create(name).write(data)
        staging.commit()


@dataclasses.dataclass
class SplitCounts:
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    documents: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))


def write_tokens(corpus: Corpus, spec: EncoderSpec, workers: int, val_fraction: float,
                 files: dict[str, BinaryIO]) -> SplitCounts:
    """Encode the corpus and append each document's tokens to its split's file (all to train
    for a single document, which `split_by_position` splits afterwards)."""
    counts = SplitCounts()
    with tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None) as bar:
        for batch, tokens, lengths in encoded(batches(corpus.pieces()), spec, workers):
            in_val = (np.zeros(len(lengths), bool) if corpus.single_document
                      else is_val_document(batch.docs, val_fraction))
            per_token = np.repeat(in_val, lengths)
            for split, pieces, mask in (("train", ~in_val, ~per_token), ("val", in_val, per_token)):
                files[split].write(tokens[mask].tobytes())
                counts.tokens[split] += int(mask.sum())
                counts.documents[split] += int((batch.last & pieces).sum())
            bar.update(batch.nbytes)
            bar.set_postfix(tokens=f"{sum(counts.tokens.values()):,}", refresh=False)
    return counts


def split_by_position(files: dict[str, BinaryIO], counts: SplitCounts, val_fraction: float,
                      itemsize: int) -> None:
    """Move the last `val_fraction` of train's tokens to val (nanoGPT's split of one text)."""
    total = counts.tokens["train"]
    n_train = int(total * (1 - val_fraction))
    train, val = files["train"], files["val"]
    train.seek(n_train * itemsize)
    shutil.copyfileobj(train, val, COPY_BYTES)
    train.truncate(n_train * itemsize)
    counts.tokens.update(train=n_train, val=total - n_train)


def prepare_stream(corpus: Corpus, out_dir: str | Path, tokenizer_name: str,
                   val_fraction: float = VAL_FRACTION, workers: int = 1) -> dict[str, Any]:
    """Tokenize `corpus`, split it and write train.bin, val.bin and meta.json to `out_dir`."""
    out_dir = Path(out_dir)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction {val_fraction} is not between 0 and 1: pass e.g. --val_fraction 0.1.")
    tokenizer = build_tokenizer(tokenizer_name, corpus)
    spec = EncoderSpec.of(tokenizer, corpus)
    print(f"tokenizer: {tokenizer.name}, vocab size: {tokenizer.vocab_size:,}, token files: {spec.dtype}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Staging(out_dir) as staging:
        files = {split: staging.create(f"{split}.bin") for split in SPLITS}
        counts = write_tokens(corpus, spec, workers, val_fraction, files)
        split = _split_kind(corpus, counts, val_fraction)
        if split == "position":
            split_by_position(files, counts, val_fraction, np.dtype(spec.dtype).itemsize)
        _check_splits(corpus, counts, val_fraction)
        meta = _meta(tokenizer, spec, counts, corpus.source, split)
        # meta.json last: it is what marks the dataset complete.
        staging.create(META_FILE).write((json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        staging.commit()
    for name in SPLITS:
        print(f"{name} has {counts.tokens[name]:,} tokens"
              + (f" ({counts.documents[name]:,} documents)" if split == "document" else ""))
    print(f"wrote {out_dir / 'train.bin'}, {out_dir / 'val.bin'} and {out_dir / META_FILE}")
    return meta


def _split_kind(corpus: Corpus, counts: SplitCounts, val_fraction: float) -> str:
    """"document" (as written), or "position" for one document, or when no document fell in val:
    a corpus of a few documents (a folder of three books) then splits as one text would."""
    if corpus.single_document:
        return "position"
    if counts.tokens["val"] == 0 and counts.tokens["train"] > 0:
        n = counts.documents["train"]
        print(f"none of the {n:,} document(s) fell in val at --val_fraction {val_fraction:g}, too few "
              f"documents to split by document: splitting the token stream by position instead.")
        return "position"
    return "document"


def _check_splits(corpus: Corpus, counts: SplitCounts, val_fraction: float) -> None:
    """A UserError naming the fix when the corpus is empty or a split came out empty."""
    tokens, documents = counts.tokens, counts.documents
    if sum(tokens.values()) == 0:
        raise UserError(f"input {corpus.source} is empty: pass --input a file (or folder) with some text.")
    if tokens["val"] and not tokens["train"] and documents["val"]:
        raise UserError(
            f"all {documents['val']:,} document(s) of {corpus.source} went to val at --val_fraction "
            f"{val_fraction:g}: pass a smaller --val_fraction, or a corpus with more documents.")
    if not (tokens["train"] and tokens["val"]):
        raise UserError(
            f"input {corpus.source} gives only {sum(tokens.values())} token(s), too few for both a train "
            f"split and a val split ({val_fraction:g} of it): pass --input a longer text.")


def _meta(tokenizer: Tokenizer, spec: EncoderSpec, counts: SplitCounts, source: str, split: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": spec.dtype,
        "train_tokens": counts.tokens["train"],
        "val_tokens": counts.tokens["val"],
        "split": split,  # "position" (one text: the last val_fraction of it) or "document"
        "documents": sum(counts.documents.values()),
        "source": source,
    }
    if isinstance(tokenizer, CharTokenizer):  # the vocabulary itself, as nanoGPT's meta.pkl
        meta["itos"] = tokenizer.itos
        meta["stoi"] = tokenizer.stoi
    return meta


def prepare_text(text: str, out_dir: str | Path, tokenizer_name: str, source: str) -> dict[str, Any]:
    """A text held in memory, as one document: split 90/10 by position (tests, small texts)."""
    return prepare_stream(text_corpus(text, source), out_dir, tokenizer_name)

# ---------------------------------------------------------------------------
# Whole datasets


def is_prepared(dataset_dir: str | Path) -> bool:
    """True iff meta.json is valid and train.bin/val.bin hold the token counts it records."""
    dataset_dir = Path(dataset_dir)
    try:
        meta = read_meta(dataset_dir)
    except UserError:
        return False
    itemsize = meta_dtype(meta).itemsize
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


def prepare_unless_done(make_corpus: Callable[[], Corpus], out_dir: str | Path, tokenizer_name: str,
                        force: bool = False, val_fraction: float = VAL_FRACTION,
                        workers: int = 1) -> dict[str, Any]:
    """`prepare_stream(make_corpus(), ...)`, unless `out_dir` already holds the dataset (and not `force`)."""
    out_dir = Path(out_dir)
    if not force and (meta := _already_prepared(out_dir, tokenizer_name)) is not None:
        return meta
    return prepare_stream(make_corpus(), out_dir, tokenizer_name, val_fraction, workers)


def prepare_shakespeare(out_dir: str | Path, tokenizer_name: str, input_path: str | Path | None = None,
                        force: bool = False) -> dict[str, Any]:
    """Tiny Shakespeare in `out_dir`, from `input_path`, else out_dir/input.txt, else downloaded."""
    out_dir = Path(out_dir)

    def corpus() -> Corpus:
        if input_path is not None:
            return txt_corpus(input_path)
        local = out_dir / "input.txt"
        downloaded = not local.exists()
        if downloaded:
            download(TINY_SHAKESPEARE_URL, local)
        return txt_corpus(local, source=TINY_SHAKESPEARE_URL if downloaded else None)

    return prepare_unless_done(corpus, out_dir, tokenizer_name, force)


def prepare_corpus(input_path: str | Path, out_dir: str | Path, tokenizer_name: str, force: bool = False,
                   field: str = DEFAULT_FIELD, val_fraction: float = VAL_FRACTION,
                   workers: int = 1) -> dict[str, Any]:
    """A user's own corpus (a .txt, .jsonl or .parquet file, or a folder of them) in `out_dir`."""
    return prepare_unless_done(lambda: files_corpus(input_path, field), out_dir, tokenizer_name, force,
                               val_fraction, workers)


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


def default_workers() -> int:
    """The CPUs this process may run on: --workers' default."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def text_main(data_root: str | Path, argv: list[str] | None = None) -> int:
    """`python data/text/prepare.py --input FILE_OR_DIR | --hf_dataset NAME [--tokenizer char|gpt2] ...`."""
    parser = argparse.ArgumentParser(
        description="Prepare your own corpus (.txt, .jsonl or .parquet files, a folder of them, or a "
                    "Hugging Face dataset) as a dataset: train.bin, val.bin and meta.json in data/NAME/. "
                    "Train on it with --config.dataset=NAME.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", help="a .txt file (one document), a .jsonl file (a document per line), "
                       "a .parquet file (a document per row), or a folder of them (searched recursively)")
    where.add_argument("--hf_dataset", metavar="NAME", help="a Hugging Face dataset to stream, a document "
                       "per row, e.g. HuggingFaceFW/fineweb-edu (needs `pip install datasets` and internet)")
    parser.add_argument("--hf_config", help="the Hugging Face dataset's configuration, e.g. sample-10BT")
    parser.add_argument("--hf_split", default="train", help="the Hugging Face dataset's split (default: %(default)s)")
    parser.add_argument("--field", default=DEFAULT_FIELD,
                        help="the .jsonl field or the column that holds each document's text (default: %(default)s)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                        help="char: one token per character; gpt2: GPT-2's BPE (default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                        help="the share of documents (of tokens, for one .txt file) that validates "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizing processes (default: the CPUs available, %(default)s)")
    parser.add_argument("--name", help="the dataset's name (default: the input's name without extension)")
    parser.add_argument("--out_dir", help="where to write the dataset (default: data/NAME)")
    parser.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    args = parser.parse_args(argv)

    def work() -> None:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: pass at least 1 (default: the CPUs available).")
        if args.hf_dataset:
            default = args.hf_dataset.rstrip("/").split("/")[-1] + (f"-{args.hf_config}" if args.hf_config else "")
            make = lambda: hf_corpus(args.hf_dataset, args.hf_config, args.hf_split, args.field)  # noqa: E731
        else:
            default = Path(args.input).resolve().stem
            make = lambda: files_corpus(args.input, args.field)  # noqa: E731
        name = args.name if args.name is not None else default
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise UserError(f"dataset name {name!r} is not a plain folder name: pass --name with "
                            f"letters, digits, '_', '-' or '.' (e.g. --name my_corpus).")
        out_dir = Path(args.out_dir) if args.out_dir is not None else Path(data_root) / name
        prepare_unless_done(make, out_dir, args.tokenizer, args.force, args.val_fraction, args.workers)
        if args.out_dir is None:
            print(f"train on it with --config.dataset={name}")

    return _run(work)
