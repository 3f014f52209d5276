"""Shared fixtures: a small character-level corpus prepared on disk, and the tiny config."""

import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

from haiku_gpt.system import collect_garbage_less_often, select_platforms

select_platforms()  # before any test imports JAX: JAX_PLATFORMS=cpu on a machine without a GPU or TPU


def _share_compilation_cache() -> None:
    """One persistent XLA cache for the session, in this process and in every launch.py subprocess
    (they inherit the environment): a program compiled by one test is loaded, not compiled, by the next.

    A cached executable is the same program, so every exact comparison in the suite holds with or
    without it; tests that count compilations count JAX's in-memory cache, which this does not touch.
    Set before JAX is imported (it reads these at import); a cache the user configured is kept.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="haiku_gpt-tests-xla-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


_share_compilation_cache()


def _fast_cpu_compiles() -> None:
    """Faster XLA:CPU compiles for this process and its subprocesses: the suite mostly compiles
    tiny programs. Backend optimization level 0, and XLA:CPU's classic loop emitters in place of
    its newer fusion emitters (`xla_cpu_use_fusion_emitters=false`, a CPU-only flag): together
    they compile in about a third of the time. One LLVM module per program
    (`xla_cpu_parallel_codegen_split_count=1`): splitting a tiny program for parallel codegen cost
    15-30% more CPU time per compile, and the suite's workers already keep both cores busy.

    Every comparison in the suite is between programs compiled alike, so each holds at any
    level; the compile-only GPU/TPU builds pin XLA's default level per compile
    (`targets.compile_for`), so their register, spill and memory reports are a real machine's.
    A value the user set in XLA_FLAGS is kept.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_parallel_codegen_split_count=1"):
        if not any(f.startswith(flag.split("=")[0] + "=") for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


_fast_cpu_compiles()


# Python's collector less often in the test processes too, as in a run (haiku_gpt.system): it cut the
# CPU time of test_kernels.py and test_model.py by about 9%.
collect_garbage_less_often()


def pytest_collection_finish(session):
    """The modules imported for collection live for the session: out of the collector's reach."""
    gc.collect()
    gc.freeze()


import pytest  # noqa: E402

from haiku_gpt.configs import tiny  # noqa: E402
from haiku_gpt import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"


def quiet(message: str) -> None:
    """A log that drops its lines (for setup(config, quiet) in tests)."""


def run_printed(mode: str, config) -> tuple[int, str]:
    """launch.py's work, `modes.run(mode, config)`, in this process: (its return code, what it printed).
    For runs whose process would add nothing to a test but the imports of JAX, haiku and orbax."""
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    from haiku_gpt import modes  # noqa: PLC0415

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = modes.run(mode, config)
    return rc, printed.getvalue()


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
    from haiku_gpt.aot import targets  # noqa: PLC0415

    try:
        targets.require_aot(name)
    except targets.AotUnavailable as e:
        return f"the aot extra is not installed ({e})"
    return None


# Compile-only tests: skipped, saying why, without `pip install -e '.[aot]'`.
needs_cuda = pytest.mark.skipif(bool(_aot_missing("h100")), reason=str(_aot_missing("h100")))
needs_tpu = pytest.mark.skipif(bool(_aot_missing("tpu-v5e")), reason=str(_aot_missing("tpu-v5e")))


# The files that take longest, longest first (measured: `pytest --durations=0`, summed per file). Under
# `--dist loadfile` each worker takes the next file in collection order when it is free, so starting with the
# long ones keeps a long file from starting last while the other workers sit idle (the greedy longest-first
# schedule). Files not listed keep their order, after these. Only the order changes, never what runs.
LONGEST_FIRST = ["test_distributed.py", "test_reliability.py", "test_compile_targets.py", "test_kernels.py",
                 "test_train.py", "test_kernels_mgpu.py", "test_launch.py", "test_metrics.py", "test_pretrained.py", "test_sample.py",
                 "test_model.py", "test_attention_dispatch.py", "test_attention_masks.py", "test_bench.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
