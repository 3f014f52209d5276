"""Streaming prepare: .txt/.jsonl/.parquet/folder/Hugging Face inputs, pieces that keep BPE's tokens,
whole documents in train or val, uint32 token files, workers, and the errors for bad input.

Expected tokens are computed independently: tiktoken on each whole document, then <|endoftext|>.
The gpt2 tests need tiktoken's cached BPE files (TIKTOKEN_CACHE_DIR; conftest points at them).
"""

import json
import random
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from haiku_gpt import corpus, prepare
from haiku_gpt.data import open_dataset
from haiku_gpt.errors import UserError
from haiku_gpt.tokenizer import load_gpt2_encoding, load_tokenizer, read_meta, token_dtype

EOT = 50256
WORDS = ["the", "king", "ROMEO", "thou", "art", "my", "lord", "and", "of", "love", "death", "1599", "é", "'s"]


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_encoding()


def documents(n: int, seed: int = 0) -> list[str]:
    """Short pseudo-English documents of a few lines, with blank lines and trailing spaces."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        docs.append(rng.choice(["\n", "\n\n", " \n"]).join(lines) + rng.choice(["", "\n", "  "]))
    return docs


def read_bins(out_dir: Path) -> tuple[list[int], ...]:
    dtype = np.dtype(read_meta(out_dir).get("dtype", "uint16"))
    return tuple(np.fromfile(out_dir / f"{split}.bin", dtype=dtype).tolist() for split in ("train", "val"))


def expected_splits(docs: list[str], gpt2, val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Each document's tokens + <|endoftext|>, to train or val by its index."""
    in_val = prepare.is_val_document(np.arange(len(docs)), val_fraction)
    train, val = [], []
    for doc, v in zip(docs, in_val):
        (val if v else train).extend(gpt2.encode_ordinary(doc) + [EOT])
    return train, val


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_parquet(path: Path, docs: list[str], column: str = "text", row_group_size: int = 7) -> None:
    pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)


# ---------------------------------------------------------------------------
# Pieces


def test_pieces_give_the_tokens_of_the_whole_text(monkeypatch, gpt2):
    """Cut at tiny sizes, random texts of words, spaces, tabs, blank lines and contractions
    encode piece by piece exactly as whole."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 3)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 10_000)  # never forced: the guarantee is exact
    atoms = ["a", "bc", " ", "  ", "\n", "\n\n", " \n", "\t", "'s", "'", "7", "12", ".", "é", "😀"]
    rng = random.Random(0)
    cuts = 0
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 60)))
        pieces, rest = corpus.cut_pieces(text, final=True)
        assert "".join(pieces) == text and rest == ""
        assert [t for p in pieces for t in gpt2.encode_ordinary(p)] == gpt2.encode_ordinary(text), pieces
        cuts += max(len(pieces) - 1, 0)
    assert cuts > 200  # the texts really were cut


def test_newline_after_whitespace_is_not_a_safe_cut(gpt2):
    """Why the cut needs a non-space before the newline: a blank line ending a piece merges ("\\n\\n")."""
    assert gpt2.encode_ordinary("a\n\n") + gpt2.encode_ordinary("b") != gpt2.encode_ordinary("a\n\nb")
    assert corpus.safe_cut("a\n\nb", 0) is None
    assert corpus.safe_cut("a\nb c", 0) == 2 and corpus.safe_cut("a\nb c", 3) == 3


def test_text_without_a_safe_cut_is_cut_at_the_maximum(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 4)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 10)
    pieces, rest = corpus.cut_pieces("x" * 25, final=False)
    assert pieces == ["x" * 10, "x" * 10] and rest == "x" * 5
    pieces, rest = corpus.cut_pieces("abcdef", final=False)  # no cut yet: wait for more text
    assert pieces == [] and rest == "abcdef"


def test_txt_is_read_in_pieces_with_universal_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "READ_BYTES", 5)  # cuts through "é" and "😀" and between "\r" and "\n"
    monkeypatch.setattr(corpus, "PIECE_CHARS", 8)
    path = tmp_path / "a.txt"
    path.write_bytes("Thé king\r\nis dead.\r\n😀 long live\rthe king\n".encode() * 5)
    pieces = list(corpus.read_txt(path))
    assert "".join(p.text for p in pieces) == path.read_text(encoding="utf-8")  # Python's universal newlines
    assert len(pieces) > 5 and [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(p.nbytes for p in pieces) == path.stat().st_size


# ---------------------------------------------------------------------------
# Inputs -> tokens


def make_folder(root: Path, docs: list[str]) -> Path:
    """docs spread over a.jsonl, b.parquet, c.txt (one document) and sub/d.jsonl, with files left out."""
    folder = root / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": d, "url": "x"} for d in docs[:20]])
    with open(folder / "a.jsonl", "a") as f:
        f.write("\n")  # a blank line is skipped
    write_parquet(folder / "b.parquet", docs[20:45])
    (folder / "c.txt").write_text(docs[45], encoding="utf-8")
    write_jsonl(folder / "sub" / "d.jsonl", [{"text": d} for d in docs[46:]])
    (folder / "notes.md").write_text("left out")
    (folder / ".cache" / "e.jsonl").write_text('{"text": "hidden"}\n')
    return folder


def test_folder_of_jsonl_parquet_and_txt(tmp_path, gpt2):
    docs = documents(60)
    folder = make_folder(tmp_path, docs)
    meta = prepare.prepare_corpus(folder, tmp_path / "out", "gpt2")

    train, val = read_bins(tmp_path / "out")
    assert (train, val) == expected_splits(docs, gpt2)
    assert val and train
    assert meta["split"] == "document" and meta["documents"] == 60 and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert prepare.is_prepared(tmp_path / "out")

    files = corpus.files_corpus(folder)  # the progress bar ends at the input's size
    assert sum(p.nbytes for p in files.pieces()) == files.total_bytes


def test_field_names_the_jsonl_field_and_parquet_column(tmp_path, gpt2):
    docs = documents(40, seed=1)
    write_jsonl(tmp_path / "a.jsonl", [{"content": d, "text": "not this"} for d in docs[:25]])
    write_parquet(tmp_path / "b.parquet", docs[25:], column="content")
    prepare.prepare_corpus(tmp_path, tmp_path / "out", "gpt2", field="content", val_fraction=0.25)
    assert read_bins(tmp_path / "out") == expected_splits(docs, gpt2, val_fraction=0.25)


def test_documents_go_whole_to_train_or_val(tmp_path, monkeypatch, gpt2):
    """.txt documents of many pieces each, over several batches: each lands whole in one split."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 50)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 120)
    folder = tmp_path / "books"
    folder.mkdir()
    docs = ["\n".join(documents(8, seed=i)) for i in range(30)]
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    meta = prepare.prepare_corpus(folder, tmp_path / "out", "gpt2", val_fraction=0.2)

    train, val = read_bins(tmp_path / "out")
    assert (train, val) == expected_splits(docs, gpt2, val_fraction=0.2)
    assert sum(len(d) > 3 * 50 for d in docs) == 30  # every document spans several pieces
    in_val = prepare.is_val_document(np.arange(30), 0.2)
    assert 0 < in_val.sum() < 30 and meta["split"] == "document"


def test_val_documents_are_a_fixed_even_share():
    index = np.arange(200_000)
    for fraction in (0.1, 0.3):
        share = prepare.is_val_document(index, fraction)
        assert abs(share.mean() - fraction) < 0.005
        assert abs(share[:1000].mean() - fraction) < 0.04  # spread along the corpus, not in one block
    assert (prepare.is_val_document(index[::-1], 0.1) == prepare.is_val_document(index, 0.1)[::-1]).all()


def test_a_few_documents_split_by_position(tmp_path):
    """When no document falls in val (two files), the stream splits 90/10 by position instead."""
    (tmp_path / "a.txt").write_text("first file\n" * 30)
    (tmp_path / "b.txt").write_text("second file, no final newline")
    meta = prepare.prepare_corpus(tmp_path, tmp_path / "out", "char")
    stream = "first file\n" * 30 + "second file, no final newline\n"  # char-level separator: "\n"
    assert meta["split"] == "position" and meta["documents"] == 2
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(len(stream) * 0.9), len(stream) - int(len(stream) * 0.9))
    train, val = read_bins(tmp_path / "out")
    assert load_tokenizer(meta).decode(train + val) == stream


def test_char_level_documents_end_with_a_newline(tmp_path):
    docs = ["ab", "cd\n", "e f"] * 20
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    meta = prepare.prepare_corpus(tmp_path / "a.jsonl", tmp_path / "out", "char")
    assert meta["itos"] == sorted(set("abcdef \n"))
    tokenizer = load_tokenizer(meta)
    in_val = prepare.is_val_document(np.arange(len(docs)), 0.1)
    train, val = read_bins(tmp_path / "out")
    assert tokenizer.decode(train) == "".join(d.rstrip("\n") + "\n" for d, v in zip(docs, in_val) if not v)
    assert tokenizer.decode(val) == "".join(d.rstrip("\n") + "\n" for d, v in zip(docs, in_val) if v)


def test_one_txt_file_is_one_document_as_before(tmp_path, monkeypatch, gpt2):
    """A single .txt file: no separator, the first 90% of its tokens train (nanoGPT's split)."""
    monkeypatch.setattr(corpus, "READ_BYTES", 100)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 64)
    text = "\n\n".join(documents(40, seed=3))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare.prepare_corpus(tmp_path / "one.txt", tmp_path / "out", "gpt2")
    ids = gpt2.encode_ordinary(text)
    assert read_bins(tmp_path / "out") == (ids[:int(len(ids) * 0.9)], ids[int(len(ids) * 0.9):])
    assert meta["split"] == "position" and meta["documents"] == 1


def test_workers_write_identical_files(tmp_path, monkeypatch):
    """Two worker processes, many batches in flight: byte for byte what one process writes."""
    monkeypatch.setattr(prepare, "BATCH_CHARS", 2_000)
    pools = []

    def counted_pool(*args, **kwargs):
        pools.append(args[0])
        return ProcessPoolExecutor(*args, **kwargs)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", counted_pool)
    docs = documents(400, seed=4)
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:200]])
    write_parquet(tmp_path / "b.parquet", docs[200:], row_group_size=50)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare.prepare_corpus(tmp_path, out, "gpt2", workers=workers)
        outputs.append({name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")})
    assert pools == [2]  # workers=2 really ran in two processes; workers=1 in this one
    assert outputs[0] == outputs[1]
    assert len(outputs[0]["train.bin"]) > 10 * 2 * 2_000 // 4  # many batches of ~2,000 characters


# ---------------------------------------------------------------------------
# uint32 token files


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    """A char vocabulary of 70,000 characters: uint32 files, which the loader reads back."""
    points = [c for c in range(0x4E00, 0x4E00 + 73_000) if not 0xD800 <= c < 0xE000][:70_000]
    text = "".join(map(chr, points)) * 2
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare.prepare_corpus(tmp_path / "wide.txt", tmp_path / "data" / "wide", "char")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    assert (tmp_path / "data" / "wide" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    assert prepare.is_prepared(tmp_path / "data" / "wide")

    dataset = open_dataset(str(tmp_path / "data"), "wide", block_size=8)
    assert dataset.splits["train"].dtype == np.uint32 and dataset.splits["train"].max() >= 2**16
    assert dataset.tokenizer.decode(np.concatenate([dataset.splits["train"], dataset.splits["val"]])) == text


def test_token_dtype_boundary():
    assert token_dtype(50257) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


def test_meta_without_dtype_reads_as_uint16(tmp_path):
    """A dataset prepared before uint32 existed (no "dtype" in meta.json) still loads."""
    prepare.prepare_text("hello world, " * 100, tmp_path / "old", "char", source="old")
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["dtype"]
    meta_path.write_text(json.dumps(meta))
    assert prepare.is_prepared(tmp_path / "old")
    dataset = open_dataset(str(tmp_path), "old", block_size=8)
    assert dataset.splits["train"].dtype == np.uint16
    assert dataset.tokenizer.decode(dataset.splits["train"][:12]) == "hello world,"

    meta_path.write_text(json.dumps({**meta, "dtype": "int8"}))
    with pytest.raises(UserError, match=r"dtype 'int8', expected one of uint16, uint32"):
        read_meta(tmp_path / "old")


# ---------------------------------------------------------------------------
# Hugging Face datasets


def fake_datasets(calls: list) -> types.ModuleType:
    """A stand-in for `datasets` that streams a folder of parquet files row by row, as
    `load_dataset(folder, streaming=True)` does (read here with pyarrow, not with haiku_gpt)."""

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        files = sorted(Path(path).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return (row for f in files for row in pq.read_table(f).to_pylist())

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_dataset_streams_the_same_documents_as_local_parquet(tmp_path, monkeypatch):
    docs = documents(50, seed=5)
    shards = tmp_path / "fineweb"
    shards.mkdir()
    write_parquet(shards / "000.parquet", docs[:30])
    write_parquet(shards / "001.parquet", docs[30:])
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))

    argv = ["--hf_dataset", str(shards), "--hf_config", "sample", "--tokenizer", "gpt2", "--workers", "1"]
    assert prepare.text_main(tmp_path / "data", argv) == 0
    prepare.prepare_corpus(shards, tmp_path / "local", "gpt2")
    assert calls and all(call == (str(shards), "sample", "train", True) for call in calls)
    hf_out = tmp_path / "data" / "fineweb-sample"
    assert read_bins(hf_out) == read_bins(tmp_path / "local")
    assert read_meta(hf_out)["source"] == f"hf:{shards}:sample:train"


def test_hf_dataset_with_the_real_datasets_library(tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed; the stand-in test covers "
                                                      "haiku_gpt's side of --hf_dataset")
    assert datasets
    docs = documents(50, seed=6)
    (tmp_path / "shards").mkdir()
    write_parquet(tmp_path / "shards" / "000.parquet", docs)
    prepare.prepare_unless_done(lambda: corpus.hf_corpus(str(tmp_path / "shards")), tmp_path / "hf", "gpt2")
    prepare.prepare_corpus(tmp_path / "shards", tmp_path / "local", "gpt2")
    assert read_bins(tmp_path / "hf") == read_bins(tmp_path / "local")


def test_hf_dataset_without_the_library_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r"needs the Hugging Face `datasets` library.*pip install datasets"):
        corpus.hf_corpus("HuggingFaceFW/fineweb-edu")


def test_hf_dataset_missing_field_names_the_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: iter([{"text": "fine"}, {"content": "no text"}])))
    pieces = corpus.hf_corpus("org/data").pieces()
    assert next(pieces).text == "fine"
    with pytest.raises(UserError, match=r"dataset 'org/data', row 1, has no 'text' field \(its fields: "
                                        r"'content'\): pass --field NAME"):
        next(pieces)


# ---------------------------------------------------------------------------
# Bad input


def test_jsonl_without_the_field_names_file_line_and_flag(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "no text", "id": 3}])
    with pytest.raises(UserError, match=r"a\.jsonl, line 3, has no 'text' field \(its fields: 'body', 'id'\): "
                                        r"pass --field NAME"):
        prepare.prepare_corpus(tmp_path / "a.jsonl", tmp_path / "out", "char")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"b\.jsonl, line 2, has a 'text' field that is int, not a string"):
        prepare.prepare_corpus(tmp_path / "b.jsonl", tmp_path / "out", "char")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": "cut off\n')
    with pytest.raises(UserError, match=r"c\.jsonl, line 2, is not JSON"):
        prepare.prepare_corpus(tmp_path / "c.jsonl", tmp_path / "out", "char")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_corrupt_parquet_names_the_file(tmp_path):
    write_parquet(tmp_path / "good.parquet", documents(20))
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(UserError, match=r"cut\.parquet is not a readable parquet file \(.*\): download it again"):
        prepare.prepare_corpus(tmp_path / "cut.parquet", tmp_path / "out", "char")
    (tmp_path / "cut.parquet").unlink()
    with pytest.raises(UserError, match=r"good\.parquet has no column 'body' \(its columns: 'text', 'id'\): "
                                        r"pass --field NAME"):
        prepare.prepare_corpus(tmp_path, tmp_path / "out", "char", field="body")


def test_inputs_without_supported_files(tmp_path):
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(UserError, match=r"has the extension '\.md', which prepare does not read: pass --input "
                                        r"a \.txt, \.jsonl, \.parquet file"):
        prepare.prepare_corpus(tmp_path / "notes.md", tmp_path / "out", "char")
    with pytest.raises(UserError, match=r"holds no \.txt, \.jsonl, \.parquet files: pass --input a folder"):
        prepare.prepare_corpus(tmp_path, tmp_path / "out", "char")


def test_a_failure_midway_keeps_the_previous_dataset(tmp_path, monkeypatch):
    """A bad line in the last file, after tokens were written: the old dataset stays, no temp files."""
    monkeypatch.setattr(prepare, "BATCH_CHARS", 500)  # batches are written before the bad line is read
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": d} for d in documents(40)])
    prepare.prepare_corpus(folder, tmp_path / "out", "gpt2")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    write_jsonl(folder / "b.jsonl", [{"text": d} for d in documents(40, seed=1)] + [{"txt": "typo"}])
    with pytest.raises(UserError, match=r"b\.jsonl, line 41, has no 'text' field"):
        prepare.prepare_corpus(folder, tmp_path / "out", "gpt2", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
