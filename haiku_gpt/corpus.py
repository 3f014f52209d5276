"""A corpus as a stream of documents, read in bounded memory (the input side of prepare.py).

Inputs, and what a document is in each:
  .txt      the whole file (UTF-8; line endings become "\\n", as Python's text mode does)
  .jsonl    one line: a JSON object whose "text" field (or --field NAME) is the document
  .parquet  one row: its "text" column (or --field NAME), read a record batch at a time
            with pyarrow; FineWeb and most Hugging Face datasets ship as parquet shards
  a folder  every .txt, .jsonl and .parquet file under it, in sorted path order (hidden
            files and folders, and files with other extensions, are left out)
  --hf_dataset NAME   a Hugging Face dataset streamed row by row with `datasets`
                      (streaming=True: nothing is downloaded in full)

Every source gives the same thing to the rest of the pipeline: an iterator of `Piece`s,
each a part of one document, with a mark on the last part of each document. Long
documents (a .txt file of gigabytes) come in pieces of about PIECE_CHARS characters, cut
only where GPT-2's BPE cuts anyway (`safe_cut`), so encoding the pieces one at a time
gives the tokens of encoding the whole document at once: exactly so whenever a cut point
occurs at least every MAX_PIECE_CHARS characters, which any text with lines or words has.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from haiku_gpt.errors import UserError
from haiku_gpt.tokenizer import one_line

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 20  # a piece is about this long: big enough to amortize, small enough to stream
MAX_PIECE_CHARS = 1 << 22  # with no safe cut in this many characters, cut anyway (see safe_cut)
READ_BYTES = 1 << 20  # .txt files are read this many bytes at a time
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch
DEFAULT_FIELD = "text"

# A cut between two pieces where GPT-2's pre-tokenizer always has a boundary whatever
# follows or precedes: after a newline that follows a non-space and precedes one
# ("end.\n|Next"), or before a single space between two non-spaces ("word| word").
# A newline after other whitespace is not safe: "\n\n" followed by a letter is two
# pre-tokens in the whole text but one ("\n\n") at the end of a piece.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


class Piece(NamedTuple):
    """Part of a document: its text, whether it ends the document, and how many input bytes it used."""

    text: str
    last: bool
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents to prepare. `pieces()` reads them from the start each time it is called
    (a char-level vocabulary needs a first pass over the text)."""

    source: str  # what meta.json records as the dataset's origin
    pieces: Callable[[], Iterator[Piece]]
    total_bytes: int | None  # the progress bar's total; None when unknown (a streamed dataset)
    single_document: bool  # one .txt file or one string: split by position, no separator


# ---------------------------------------------------------------------------
# Cutting a long text into pieces


def safe_cut(text: str, start: int, end: int | None = None) -> int | None:
    """The first position in [start, end) where `text` can be cut without changing its BPE tokens, or None."""
    match = _SAFE_CUT.search(text, max(start, 1), len(text) if end is None else end)
    return match.start() if match else None


def cut_pieces(text: str, final: bool) -> tuple[list[str], str]:
    """`text` as pieces of about PIECE_CHARS characters, and the rest still to be cut.

    `final`: no text follows, so the rest becomes the last piece. A stretch of more than
    MAX_PIECE_CHARS characters without a safe cut is cut at that length anyway (only the
    tokens at such a cut can differ from encoding the text whole).
    """
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        # +2: the cut's look-ahead sees the two characters after it.
        cut = safe_cut(text, start + PIECE_CHARS, min(len(text), start + MAX_PIECE_CHARS + 2))
        if cut is None or cut - start > MAX_PIECE_CHARS:
            if len(text) - start <= MAX_PIECE_CHARS:
                break  # wait for a safe cut in the next block, or end with the rest
            cut = start + MAX_PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut  # a cut leaves at least one character after it
    rest = text[start:]
    if final and rest:
        pieces.append(rest)
        rest = ""
    return pieces, rest


def document_pieces(documents: Iterable[tuple[str, int]]) -> Iterator[Piece]:
    """(text, input bytes) documents as pieces. An empty document is left out: it gives at most
    a Piece("", last=False) that carries its input bytes to the progress bar."""
    for text, nbytes in documents:
        pieces, _ = cut_pieces(text, final=True)
        if not pieces:
            if nbytes:
                yield Piece("", False, nbytes)
            continue
        for i, piece in enumerate(pieces):
            yield Piece(piece, i == len(pieces) - 1, nbytes if i == 0 else 0)


# ---------------------------------------------------------------------------
# Files


def list_files(path: str | Path) -> list[Path]:
    """The supported files of `path`: itself, or those under a folder in sorted path order."""
    path = Path(path)
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if not path.exists():
        raise UserError(f"input {path} does not exist: pass --input with the path of a {supported} "
                        f"file or of a folder of them.")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(f"input {path} has the extension {path.suffix or '(none)'!r}, which prepare "
                            f"does not read: pass --input a {supported} file (rename a plain text file "
                            f"to .txt), or a folder of them.")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"the folder {path} holds no {supported} files: pass --input a folder with "
                        f"such files in it (they may be in subfolders), or one file.")
    return files


def read_txt(path: Path) -> Iterator[Piece]:
    """A .txt file as one document, read READ_BYTES at a time (universal newlines, as open() does)."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    text, offset, unreported = "", 0, 0  # unreported: bytes read but not yet given to a piece
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                text += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (near byte {offset}: {one_line(e)}): convert it to UTF-8 "
                    f"(e.g. `iconv -t UTF-8`) or leave it out of --input.") from e
            offset += len(block)
            unreported += len(block)
            pieces, text = cut_pieces(text, final=not block)
            for i, piece in enumerate(pieces):
                yield Piece(piece, not block and i == len(pieces) - 1, unreported)
                unreported = 0
            if not block:
                return


def jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    """The `field` of each line's JSON object (a blank line is an empty document, left out later)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}, line {number}, is not JSON ({one_line(e)}): fix or remove that "
                                f"line; a .jsonl file holds one JSON object per line.") from e
            yield document_text(row, field, f"{path}, line {number},"), len(line)


def document_text(row: Any, field: str, where: str) -> str:
    """`row[field]` when it is a string, else a UserError that says `where` and names --field."""
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field]
    if not isinstance(row, dict):
        problem = f"is a JSON {type(row).__name__}, not an object with a {field!r} field"
    elif field not in row:
        keys = ", ".join(repr(k) for k in list(row)[:20]) or "none"
        problem = f"has no {field!r} field (its fields: {keys})"
    else:
        problem = f"has a {field!r} field that is {type(row[field]).__name__}, not a string"
    raise UserError(f"{where} {problem}: pass --field NAME with the field that holds each document's "
                    f"text (default: {DEFAULT_FIELD!r}), or fix the input.")


def parquet_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    """The `field` column of each row, read PARQUET_BATCH_ROWS rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def corrupt(e: Exception) -> UserError:
        return UserError(f"{path} is not a readable parquet file ({one_line(e)}): download it again, "
                         f"or leave it out of --input.")

    try:
        file = pq.ParquetFile(path)
        names, rows, size = file.schema_arrow.names, file.metadata.num_rows, path.stat().st_size
    except (pa.ArrowException, OSError) as e:
        raise corrupt(e) from e
    if field not in names:
        columns = ", ".join(repr(n) for n in names[:20]) or "none"
        raise UserError(f"{path} has no column {field!r} (its columns: {columns}): pass --field NAME "
                        f"with the column that holds each document's text.")
    done, counted = 0, 0
    try:
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            column = batch.column(0)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise UserError(f"{path}: column {field!r} holds {column.type}, not text: pass --field "
                                f"NAME with the column that holds each document's text.")
            # The batch's share of the file's bytes goes to the progress bar with its first row.
            nbytes = size * (done + len(column)) // max(rows, 1) - counted
            counted += nbytes
            for i, text in enumerate(column.to_pylist()):
                if text is None:
                    raise UserError(f"{path}, row {done + i}, has no {field!r} value (null): fix the "
                                    f"input, or pass --field NAME with another column.")
                yield text, nbytes if i == 0 else 0
            done += len(column)
    except (pa.ArrowException, OSError) as e:
        raise corrupt(e) from e


def file_pieces(files: list[Path], field: str) -> Iterator[Piece]:
    """Every document of `files`, in order, as pieces."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from read_txt(path)
        elif suffix == ".jsonl":
            yield from document_pieces(jsonl_documents(path, field))
        else:
            yield from document_pieces(parquet_documents(path, field))


def files_corpus(path: str | Path, field: str = DEFAULT_FIELD) -> Corpus:
    """The files of `--input PATH` (a file, or a folder of them)."""
    files = list_files(path)
    single = len(files) == 1 and files[0].suffix.lower() == ".txt"
    return Corpus(source=str(Path(path).resolve()), pieces=lambda: file_pieces(files, field),
                  total_bytes=sum(f.stat().st_size for f in files), single_document=single)


# ---------------------------------------------------------------------------
# Other sources


def txt_corpus(path: str | Path, source: str | None = None) -> Corpus:
    """One text file as one document, whatever its name (tiny Shakespeare's input.txt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input {path} does not exist: pass --input with the path of a text file.")
    return Corpus(source=source or str(path.resolve()), pieces=lambda: read_txt(path),
                  total_bytes=path.stat().st_size, single_document=True)


def text_corpus(text: str, source: str) -> Corpus:
    """One document held in memory (tests, and small texts already read)."""
    return Corpus(source=source, pieces=lambda: document_pieces([(text, len(text.encode("utf-8")))]),
                  total_bytes=None, single_document=True)


def hf_rows(name: str, config: str | None, split: str) -> Iterable[dict]:
    """The rows of a Hugging Face dataset, streamed (`datasets` is imported only here)."""
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"--hf_dataset needs the Hugging Face `datasets` library ({one_line(e)}): "
                        f"`pip install datasets`, or download the dataset's parquet files and pass "
                        f"their folder with --input.") from e
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # unknown names, no internet, a missing config: all end up here
        raise UserError(f"could not open the Hugging Face dataset {name!r} (config {config!r}, split "
                        f"{split!r}): {one_line(e)}. Check --hf_dataset, --hf_config and --hf_split, "
                        f"and the internet connection.") from e


def row_documents(rows: Iterable[Any], field: str, where: str) -> Iterator[tuple[str, int]]:
    """The `field` of each row of a streamed dataset; input bytes are the text's UTF-8 bytes."""
    for number, row in enumerate(rows):
        text = document_text(row, field, f"{where}, row {number},")
        yield text, len(text.encode("utf-8"))


def hf_corpus(name: str, config: str | None = None, split: str = "train", field: str = DEFAULT_FIELD) -> Corpus:
    """`--hf_dataset NAME`: a Hugging Face dataset, one document per row, streamed."""
    where = f"Hugging Face dataset {name!r}"
    hf_rows(name, config, split)  # fail now, before any work, if it can't be opened
    return Corpus(source=f"hf:{name}" + (f":{config}" if config else "") + f":{split}",
                  pieces=lambda: document_pieces(row_documents(hf_rows(name, config, split), field, where)),
                  total_bytes=None, single_document=False)
