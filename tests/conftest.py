"""Shared fixtures: a small character-level corpus prepared on disk, and the tiny config."""

import os
from pathlib import Path

from haiku_gpt.system import select_platforms

select_platforms()  # before any test imports JAX: JAX_PLATFORMS=cpu on a machine without a GPU or TPU

import pytest  # noqa: E402

from configs import tiny  # noqa: E402
from haiku_gpt import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


def corpus_text(n_chars: int = 60_000) -> str:
    """The start of tiny Shakespeare when it is at hand, else a deterministic stand-in with its alphabet."""
    if TINY_SHAKESPEARE.is_file():
        return TINY_SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
    import random
    rng = random.Random(0)
    words = ["the", "king", "ROMEO", "JULIET", "thou", "art", "my", "lord", "and", "of", "to", "love", "death"]
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ",")
    return "\n".join(lines)[:n_chars]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A data_dir holding dataset 'chars' (character-level) for the tiny config."""
    root = tmp_path_factory.mktemp("data")
    prepare.prepare_text(corpus_text(), root / "chars", "char", source="tests")
    return str(root)


@pytest.fixture
def tiny_config(data_dir, tmp_path):
    config = tiny.get_config()
    config.data_dir = data_dir
    config.dataset = "chars"
    config.out_dir = str(tmp_path / "out")
    return config


@pytest.fixture(autouse=True, scope="session")
def _tiktoken_cache():
    """Point tiktoken at the shared BPE files when nobody configured it (no internet here)."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
    yield


def _aot_missing(name: str) -> str | None:
    """Why compiling for target `name` cannot run here (the aot extra is missing), or None."""
    from haiku_gpt import targets  # noqa: PLC0415

    try:
        targets.require_aot(name)
    except targets.AotUnavailable as e:
        return f"the aot extra is not installed ({e})"
    return None


# Compile-only tests: skipped, saying why, without `pip install -e '.[aot]'`.
needs_cuda = pytest.mark.skipif(bool(_aot_missing("h100")), reason=str(_aot_missing("h100")))
needs_tpu = pytest.mark.skipif(bool(_aot_missing("tpu-v5e")), reason=str(_aot_missing("tpu-v5e")))
