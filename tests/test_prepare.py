"""Dataset preparation and tokenizers: splits, meta.json, atomic writes, downloads, errors.

Never touches the network: downloads go through a monkeypatched urlopen. The
gpt2 tests need tiktoken's cached BPE files (TIKTOKEN_CACHE_DIR; CI sets it).
"""

import io
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from haiku_gpt import prepare
from haiku_gpt.errors import UserError
from haiku_gpt.tokenizer import CharTokenizer, load_gpt2_encoding, load_tokenizer, read_meta

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


@pytest.fixture
def gpt2_available(monkeypatch):
    """Skip only when nobody pointed tiktoken at its files and it can't fetch them either."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
    try:
        load_gpt2_encoding()
    except UserError:
        if "TIKTOKEN_CACHE_DIR" in os.environ:
            raise  # it was set up to work: a failure is a real failure
        pytest.skip("GPT-2 BPE files unavailable offline (set TIKTOKEN_CACHE_DIR)")


def load_split(out_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)


def test_char_prepare_splits_meta_and_round_trip(tmp_path):
    meta = prepare.prepare_text(TEXT, tmp_path, "char", source="synthetic")
    train, val = load_split(tmp_path, "train"), load_split(tmp_path, "val")

    n = len(TEXT)  # one token per character
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)
    assert train.dtype == np.uint16
    assert meta == read_meta(tmp_path)
    assert meta["format"] == 1 and meta["tokenizer"] == "char" and meta["source"] == "synthetic"
    assert meta["itos"] == sorted(set(TEXT)) and meta["vocab_size"] == len(set(TEXT))
    assert meta["stoi"] == {ch: i for i, ch in enumerate(meta["itos"])}
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert prepare.is_prepared(tmp_path)

    tokenizer = load_tokenizer(meta)
    assert tokenizer.name == "char" and tokenizer.vocab_size == meta["vocab_size"]
    assert tokenizer.decode(np.concatenate([train, val])) == TEXT
    assert tokenizer.decode(tokenizer.encode("Speak, Citizen")) == "Speak, Citizen"


def test_unknown_prompt_characters_are_a_user_error():
    tokenizer = CharTokenizer.from_text("abc \n")
    with pytest.raises(UserError, match=r"'Z'.*'é'.*comes from the training text"):
        tokenizer.encode("a Zé")


def test_gpt2_prepare(tmp_path, gpt2_available):
    meta = prepare.prepare_text(TEXT, tmp_path, "gpt2", source="synthetic")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert "itos" not in meta and "stoi" not in meta

    tokenizer = load_tokenizer(read_meta(tmp_path))
    assert tokenizer.encode("hello world") == [31373, 995]
    ids = np.concatenate([load_split(tmp_path, "train"), load_split(tmp_path, "val")])
    assert ids.tolist() == tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT


def test_gpt2_unavailable_is_a_user_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match=r"(?s)no internet\?.*TIKTOKEN_CACHE_DIR.*ConnectionError: Failed"):
        load_gpt2_encoding()


def test_text_prepare_from_a_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("second file\n" * 10)
    (corpus / "a.txt").write_text("first file, no final newline")
    (corpus / "notes.md").write_text("not included")

    meta = prepare.prepare_corpus(corpus, tmp_path / "out", "char")
    expected = "first file, no final newline\n" + "second file\n" * 10
    ids = np.concatenate([load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")])
    assert load_tokenizer(meta).decode(ids) == expected
    assert meta["source"] == str(corpus.resolve())


@pytest.mark.parametrize("text, message", [("", "is empty"), ("x", "too few")])
def test_too_little_text_is_a_user_error(tmp_path, text, message):
    (tmp_path / "in.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        prepare.prepare_corpus(tmp_path / "in.txt", tmp_path / "out", "char")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_or_corrupt_meta_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"dataset not prepared.*python data/.*/prepare.py"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt.*--force"):
        read_meta(tmp_path)
    assert not prepare.is_prepared(tmp_path)


def test_failed_prepare_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    prepare.prepare_text(TEXT, tmp_path, "char", source="old")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # Fail on the second fsync: train.bin's temporary file is fully written, val.bin's is not.
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        prepare.prepare_text("a different text " * 50, tmp_path, "char", source="new")

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files either
    assert read_meta(tmp_path)["source"] == "old" and prepare.is_prepared(tmp_path)


def test_already_prepared_is_kept_unless_forced(tmp_path, capsys):
    (tmp_path / "input.txt").write_text(TEXT)
    prepare.prepare_shakespeare(tmp_path, "char")
    (tmp_path / "input.txt").write_text(TEXT + "more text\n")
    assert prepare.prepare_shakespeare(tmp_path, "char")["train_tokens"] == int(len(TEXT) * 0.9)
    assert "already prepared" in capsys.readouterr().out
    forced = prepare.prepare_shakespeare(tmp_path, "char", force=True)
    assert forced["train_tokens"] == int((len(TEXT) + 10) * 0.9)


def fake_urlopen(body: bytes, calls: list):
    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(body)

    return urlopen


def test_download_then_prepare(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(TEXT.encode(), calls))
    meta = prepare.prepare_shakespeare(tmp_path, "char")
    assert calls == [prepare.TINY_SHAKESPEARE_URL]
    assert meta["source"] == prepare.TINY_SHAKESPEARE_URL
    assert (tmp_path / "input.txt").read_text() == TEXT

    # A second time, with --force, the downloaded copy is reused.
    prepare.prepare_shakespeare(tmp_path, "char", force=True)
    assert len(calls) == 1


def test_download_failure_is_a_user_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"no internet\? pass --input PATH/to/input.txt"):
        prepare.prepare_shakespeare(tmp_path, "char")
    assert list(tmp_path.iterdir()) == []  # no partial input.txt


def test_ensure_prepared(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(TEXT.encode(), calls))
    dataset = tmp_path / "shakespeare_char"
    prepare.ensure_prepared(str(dataset), "shakespeare_char")
    assert prepare.is_prepared(dataset) and read_meta(dataset)["tokenizer"] == "char"
    prepare.ensure_prepared(str(dataset), "shakespeare_char")  # already there: nothing to do
    assert len(calls) == 1

    with pytest.raises(UserError, match=r"data/text/prepare.py --input .* --name mine"):
        prepare.ensure_prepared(str(tmp_path / "mine"), "mine")


def test_text_script(tmp_path):
    (tmp_path / "story.txt").write_text(TEXT)
    out = tmp_path / "out"
    result = script("data/text/prepare.py", "--input", str(tmp_path / "story.txt"), "--out_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert read_meta(out)["train_tokens"] == int(len(TEXT) * 0.9)

    result = script("data/text/prepare.py", "--input", str(tmp_path / "story.txt"), "--out_dir", str(out))
    assert result.returncode == 0 and "already prepared" in result.stdout


def test_script_error_has_message_and_no_traceback(tmp_path):
    result = script("data/text/prepare.py", "--input", str(tmp_path / "missing.txt"), "--name", "x")
    assert result.returncode == 2
    assert "does not exist: pass --input" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (REPO / "data" / "x").exists()


def test_tiny_shakespeare(tmp_path, gpt2_available):
    """The real corpus: nanoGPT's numbers for the char-level split, and an exact chunked BPE."""
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"{TINY_SHAKESPEARE} not present")
    result = script("data/shakespeare_char/prepare.py", "--input", str(TINY_SHAKESPEARE),
                    "--out_dir", str(tmp_path / "char"))
    assert result.returncode == 0, result.stderr
    meta = read_meta(tmp_path / "char")
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1003854, 111540)

    meta = prepare.prepare_shakespeare(tmp_path / "gpt2", "gpt2", input_path=TINY_SHAKESPEARE)
    # 338,025 BPE tokens in all, as nanoGPT's data/shakespeare (301,966 + 36,059).
    assert (meta["train_tokens"], meta["val_tokens"]) == (304222, 33803)
