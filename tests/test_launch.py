"""launch.py end to end in subprocesses: prepare -> train -> sample -> eval, and every bad input.

A bad input must give a one-paragraph `error: ...` on stderr, a non-zero exit
code, no traceback, and leave prepared data and checkpoints as they were.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from haiku_gpt.configs import tiny
from haiku_gpt import modes
from haiku_gpt.errors import UserError
from haiku_gpt.system import GC_FIRST_GENERATION_THRESHOLD
from tests.conftest import REPO, corpus_text


def launch(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(data_dir, out_dir, *extra):
    return ["--config=configs/tiny.py", f"--config.data_dir={data_dir}", "--config.dataset=chars",
            f"--config.out_dir={out_dir}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Prepare a corpus with data/text/prepare.py, then train the tiny config on it."""
    root = tmp_path_factory.mktemp("e2e")
    text = root / "corpus.txt"
    text.write_text(corpus_text())
    data_dir = root / "data"
    prep = subprocess.run([sys.executable, "data/text/prepare.py", "--input", str(text), "--tokenizer", "char",
                           "--name", "chars", "--out_dir", str(data_dir / "chars")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    out_dir = root / "out"
    result = launch(*tiny_args(data_dir, out_dir))
    assert result.returncode == 0, result.stderr
    # The training run's own records, before later tests (--mode=eval) append to out_dir's file.
    (root / "training-metrics.jsonl").write_text((out_dir / "metrics.jsonl").read_text())
    return data_dir, out_dir, result


def training_metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir.parent / "training-metrics.jsonl").read_text().splitlines()]


def test_train_prints_nanogpt_style_progress(trained):
    _, out_dir, result = trained
    assert "number of parameters: 0.03M" in result.stdout
    assert "step 20: train loss" in result.stdout and "iter 15: loss" in result.stdout
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[1]) == {"step", "loss", "lr", "grad_norm", "update_norm", "param_norm", "dt_ms",
                             "tokens_per_sec", "mfu"}
    assert list(out_dir.glob("events.out.tfevents.*"))  # TensorBoard, on by default
    assert (out_dir / "loss.png").exists()


def test_sample_prints_samples_separated_by_dashes_and_is_reproducible(trained):
    data_dir, out_dir, _ = trained
    args = tiny_args(data_dir, out_dir, "--mode=sample", "--config.sample.start=ROMEO:",
                     "--config.sample.num_samples=2", "--config.sample.max_new_tokens=30")
    first, second = launch(*args), launch(*args)
    assert first.returncode == 0, first.stderr
    samples = first.stdout.split("-" * 17 + "\n")
    texts = [s.split("\n", 1)[1] if s.startswith("sampling") else s for s in samples]
    assert sum(1 for t in samples if "ROMEO:" in t) == 2
    assert first.stdout == second.stdout  # same seed, same text
    assert "Traceback" not in first.stderr and texts


def test_eval_mode_reports_and_records_losses(trained):
    """--mode=eval prints the newest checkpoint's losses and appends exactly those to metrics.jsonl;
    they equal what training recorded for that step (same weights, same (seed, step) batches)."""
    data_dir, out_dir, _ = trained
    before = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    result = launch(*tiny_args(data_dir, out_dir, "--mode=eval"))
    assert result.returncode == 0, result.stderr
    after = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert after[:-1] == before and set(after[-1]) == {"step", "train_loss", "val_loss"}
    record = after[-1]
    assert f"step {record['step']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}" \
        in result.stdout
    trained_eval = [r for r in training_metrics(out_dir) if r.get("step") == record["step"] and "val_loss" in r]
    assert record["step"] == 20 and trained_eval, before
    assert record["train_loss"] == pytest.approx(trained_eval[-1]["train_loss"], rel=1e-5)
    assert record["val_loss"] == pytest.approx(trained_eval[-1]["val_loss"], rel=1e-5)


def test_export_mode_writes_hugging_face_gpt2(trained, tmp_path):
    """--mode=export (tests/test_export.py has the details): the files, out_dir untouched."""
    data_dir, out_dir, _ = trained
    before = snapshot(out_dir)
    result = launch(*tiny_args(data_dir, out_dir, "--mode=export", f"--config.export_dir={tmp_path / 'hf'}"))
    assert result.returncode == 0, result.stderr
    assert f"exported step 20 of {out_dir} as Hugging Face GPT-2 to {tmp_path / 'hf'}" in result.stdout
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "meta.json", "model.safetensors"]
    assert snapshot(out_dir) == before


def test_attention_impls_train_alike(trained, tmp_path):
    """The launched run (reference attention) and the same run with attention_impl=xla, the latter as
    launch.py's work in this process: what is compared is the attention, not the process."""
    data_dir, out_dir, _ = trained
    ref = training_metrics(out_dir)
    config = tiny.get_config()
    config.update(data_dir=str(data_dir), dataset="chars", out_dir=str(tmp_path / "xla"), attention_impl="xla")
    assert modes.run("train", config) == 0
    xla = [json.loads(x) for x in (tmp_path / "xla" / "metrics.jsonl").read_text().splitlines()]
    assert len(xla) == len(ref) and sum("val_loss" in r for r in ref) >= 2, (len(ref), len(xla))
    for a, b in zip(ref, xla):
        assert a["step"] == b["step"]
        for key in ("loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4)


def snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# Flags refused while absl parses them, and one refused by the config checks: each in a real process,
# for the exit-code contract (one `error:` paragraph on stderr, exit code 2, no traceback, nothing changed).
BAD_FLAGS = [
    # (extra args, expected message fragment)
    (["--config.foo=1"], "unknown config field 'foo'"),
    (["--config.n_layr=3"], 'Did you mean "n_layer"'),
    (["--config.n_layer=abc"], "invalid literal for int()"),
    (["--mode=bogus"], "value should be one of <train|sample|eval"),
    (["--config=configs/nonexistent.py"], "cannot load the config file"),
    (["--config.n_embd=33"], "n_embd=33 is not divisible by n_head=2"),
]


def test_an_unknown_field_without_a_config_file_is_one_clear_paragraph():
    """ml_collections applies --config.<field> to the default config while the flag is defined, before absl
    parses anything: the unknown field is reported there, as a paragraph."""
    result = launch("--config.nosuch=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: unknown config field") and "nosuch" in result.stderr, result.stderr


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_input_is_one_clear_paragraph(trained, extra, message):
    data_dir, out_dir, _ = trained
    before = snapshot(out_dir) | snapshot(data_dir)
    args = tiny_args(data_dir, out_dir, *extra)
    if extra[0].startswith("--config="):
        args = [extra[0], *args[1:-1]]
    result = launch(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr
    assert snapshot(out_dir) | snapshot(data_dir) == before  # nothing lost or changed


# Values the config checks refuse. They reach the user as the UserError above does (launch.main prints
# it as `error: ...` and exits 2), so they run in this process, through what launch.py runs (`modes.run`).
BAD_VALUES = [
    # (mode, config fields, expected message fragment)
    ("train", {"attention_impl": "flashy"},
     "unknown attention_impl 'flashy'; choose one of reference, blocked, xla, cudnn, pallas"),
    ("train", {"attention_impl": "cudnn", "dtype": "bfloat16"},
     "attention_impl='cudnn' runs only on an NVIDIA GPU, and this run is on cpu"),
    ("check", {"target": "b200x8"}, "invalid target 'b200x8' (not a known target name): valid targets are"),
    ("train", {"target": "h100"}, "works only with --mode=check (not --mode=train)"),
    ("train", {"dtype": "float16"}, "--config.dtype='float16' is not supported"),
    ("train", {"n_kv_head": 3}, "--config.n_kv_head=3 does not divide n_head=2"),
    ("train", {"document_mask": True}, "prepared with the 'char' tokenizer, which has no such token"),
    ("export", {"n_kv_head": 1}, "(grouped-query attention), so it has no GPT-2 form"),
    ("train", {"dataset": "nope"}, "run `python data/text/prepare.py --input PATH/to/text --name nope`"),
    ("train", {"block_size": 100000}, "too few for block_size=100000"),
    ("sample", {"sample.start": "ROMEO: \u2603"}, "not in the char-level vocabulary"),
    ("sample", {"sample.max_new_tokens": 0}, "max_new_tokens=0"),
    ("sample", {"sample.top_k": 1000}, "top_k=1000 is larger than the vocabulary"),
    ("sample", {"sample.start": "FILE:/nonexistent/prompt.txt"}, "cannot read the prompt file"),
]


@pytest.mark.parametrize("mode, fields, message", BAD_VALUES,
                         ids=[f"{m} " + " ".join(f"{k}={v}" for k, v in f.items()) for m, f, _ in BAD_VALUES])
def test_bad_config_value_is_refused_naming_the_fix(trained, mode, fields, message):
    data_dir, out_dir, _ = trained
    config = tiny.get_config()
    config.update(data_dir=str(data_dir), dataset="chars", out_dir=str(out_dir))
    for key, value in fields.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    before = snapshot(out_dir) | snapshot(data_dir)
    with pytest.raises(UserError) as e:
        modes.run(mode, config)
    assert message in str(e.value) and "\n" not in str(e.value).strip()
    assert snapshot(out_dir) | snapshot(data_dir) == before  # nothing lost or changed


def test_sampling_without_checkpoint(trained, tmp_path):
    data_dir, _, _ = trained
    result = launch(*tiny_args(data_dir, tmp_path / "empty", "--mode=sample"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no checkpoint found" in result.stderr


def test_out_dir_not_writable(trained, tmp_path):
    data_dir, _, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = launch(*tiny_args(data_dir, blocker / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is not writable" in result.stderr


# Imports `module` with glibc's mallopt replaced by a recorder, and prints the parameters it was called with.
_RECORD_MALLOPT = """
import ctypes, ctypes.util, gc, importlib, json, sys
calls, libc, real_cdll = [], ctypes.util.find_library("c"), ctypes.CDLL

class Libc:
    def __init__(self, lib):
        self._lib = lib
    def mallopt(self, param, value):
        calls.append(param)
        return 1
    def __getattr__(self, name):
        return getattr(self._lib, name)

ctypes.CDLL = lambda name, *a, **k: Libc(real_cdll(name, *a, **k)) if name == libc else real_cdll(name, *a, **k)
sys.argv = ["launch.py"]
importlib.import_module(MODULE)
print(json.dumps({"mallopt": calls, "gc_threshold": gc.get_threshold()[0]}))
"""


@pytest.mark.parametrize("module", ["launch", "haiku_gpt.benchmarks.bench"])
@pytest.mark.parametrize("platforms, tuned", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_allocator_is_tuned_only_for_a_cpu_run(module, platforms, tuned):
    """launch.py and the benchmark tune glibc's allocator (mallopt: no mmap, no trimming, a top pad) only
    when the run is on the CPU, the one platform it was measured to help; on a GPU or TPU (faked with
    JAX_PLATFORMS: nothing starts JAX here) glibc's defaults stay. Python's collector runs less often on
    every platform (its first-generation threshold raised from 700, `system.collect_garbage_less_often`)."""
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    run = subprocess.run([sys.executable, "-c", _RECORD_MALLOPT.replace("MODULE", repr(module))], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["mallopt"] == ([-4, -1, -2] if tuned else []), (module, platforms)
    assert record["gc_threshold"] == GC_FIRST_GENERATION_THRESHOLD > 700, (module, platforms)
