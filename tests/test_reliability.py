"""Reliability through launch.py, in subprocesses: crashes, damaged checkpoints, NaN, signals, preflight.

Every failure must be a one-paragraph `error: ...` with a non-zero exit code and no
traceback, and must leave existing checkpoints as they were. Runs use the tiny
config with `check_attention` off (it only slows the compile down here).
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

from haiku_gpt.configs import tiny
from haiku_gpt import checkpoint, checkpoint_npz, costs, modes, preflight, prepare
from haiku_gpt.config import model_config
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import setup
from tests.conftest import REPO, corpus_text, quiet, run_printed

ENV = dict(os.environ, JAX_PLATFORMS="cpu")



def launch_cmd(data_dir, out_dir, *extra):
    return [sys.executable, str(REPO / "launch.py"), "--config=configs/tiny.py", f"--config.data_dir={data_dir}",
            "--config.dataset=chars", f"--config.out_dir={out_dir}", "--config.check_attention=False", *extra]


def launch(data_dir, out_dir, *extra, timeout=240):
    return subprocess.run(launch_cmd(data_dir, out_dir, *extra), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def start(data_dir, out_dir, *extra):
    return subprocess.Popen(launch_cmd(data_dir, out_dir, *extra), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_metrics(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(out_dir, key="loss"):
    """The newest record of each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r[key] for r in read_metrics(out_dir) if key in r}


def _tiny(data_dir, out_dir, **fields):
    """The tiny config on `data_dir`'s 'chars' with `fields`, as launch_cmd's flags give it."""
    config = tiny.get_config()
    config.update(**{"data_dir": str(data_dir), "dataset": "chars", "out_dir": str(out_dir),
                     "check_attention": False, **fields})
    return config


def refused(data_dir, out_dir, mode="train", **fields) -> str:
    """The UserError message of launch.py's own work, `modes.run(mode, config)`, run in this process, for the
    tiny config with `fields` (tests/test_launch.py checks in real processes that such an error exits
    with code 2 as one `error:` paragraph: a process per case would add nothing here)."""
    config = _tiny(data_dir, out_dir, **fields)
    with pytest.raises(UserError) as e:
        modes.run(mode, config)
    message = str(e.value)
    assert "\n" not in message.strip(), message  # one paragraph
    return message


def run_here(data_dir, out_dir, mode="train", **fields) -> str:
    """launch.py's work, `modes.run(mode, config)`, in this process for the tiny config with `fields`;
    returns what it printed. For runs whose process adds nothing to the test (no signal, no exit code, no
    stderr): a process costs the suite its imports of JAX, haiku and orbax again."""
    rc, printed = run_printed(mode, _tiny(data_dir, out_dir, **fields))
    assert rc == 0
    return printed


def checkpoint_steps(out_dir):
    return [int(Path(p).name.split("_")[1]) for p in checkpoint.list_checkpoints(str(out_dir))]


def snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def wait_for(predicate, proc, timeout=120, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Datasets: 'chars' (the corpus), 'digits' (another, smaller vocabulary), 'swapped' (same size, other chars)."""
    root = tmp_path_factory.mktemp("reliability-data")
    text = corpus_text()
    prepare.prepare_text(text, root / "chars", "char", source="tests")
    rng = np.random.default_rng(0)
    prepare.prepare_text("".join(rng.choice(list("0123456789 \n"), 20_000)), root / "digits", "char", source="tests")
    missing = next(c for c in "#@%&~^" if c not in text)
    prepare.prepare_text(text.replace("e", missing), root / "swapped", "char", source="tests")
    return root


RUN_FIELDS = dict(max_iters=20, eval_interval=5, log_interval=1, always_save_checkpoint=True, keep_checkpoints=5)
RUN = [f"--config.{k}={v}" for k, v in RUN_FIELDS.items()]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished tiny run with checkpoints at steps 5, 10, 15 and 20."""
    out_dir = tmp_path_factory.mktemp("reliability-run") / "out"
    run_here(data_dir, out_dir, **RUN_FIELDS)
    assert checkpoint_steps(out_dir) == [5, 10, 15, 20]
    return out_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(trained, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, crashes and exact resume


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_file(step_dir: Path) -> Path:
    """The largest file of a checkpoint's state: one of orbax's OCDBT data files, which hold the arrays."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _intact(step_dir: Path) -> bool:
    """The checkpoint's arrays read back and match the fingerprints in its meta (read without a template,
    the state's leaves come in another order: compared as sorted lists)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
        state = ocp.StandardCheckpointer().restore(step_dir / "state")
    except Exception:  # noqa: BLE001 (orbax raises several types for unreadable files)
        return False
    saved = checkpoint.read_meta(str(step_dir))["fingerprint"]
    return sorted(int(v) for v in checkpoint.fingerprint(state)) == sorted(saved)


def test_resume_skips_a_truncated_newest_checkpoint_and_leftover_temporaries(data_dir, run_copy):
    root = run_copy / "checkpoints"
    newest = root / "step_00000020"
    assert _intact(newest)
    _truncate(_data_file(newest))
    assert not _intact(newest)
    stray = root / "step_00000025.orbax-checkpoint-tmp-1764633600000000"  # a writer killed mid-save
    shutil.copytree(root / "step_00000015", stray)
    _truncate(_data_file(stray))
    assert checkpoint_steps(run_copy) == [5, 10, 15, 20]  # the temporary directory is not a checkpoint

    result = launch(data_dir, run_copy, *RUN, "--config.max_iters=25", "--config.init_from=resume")
    assert result.returncode == 0, result.stderr
    assert "warning: skipped damaged checkpoint" in result.stdout and "step_00000020: cannot be read" in result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr  # one line per damage
    assert "resuming from step 15 " in result.stdout
    assert checkpoint_steps(run_copy) == [5, 10, 15, 20, 25]  # step 20 saved again, intact
    assert _intact(newest) and _intact(root / "step_00000025")
    assert not stray.exists()  # removed when the run opened its checkpoints


def test_corrupted_newest_checkpoint_is_skipped_by_eval_and_sample(data_dir, run_copy):
    _flip_bytes(_data_file(run_copy / "checkpoints" / "step_00000020"))  # orbax reads it back without error
    printed = run_here(data_dir, run_copy, "eval")
    assert "step_00000020: its arrays differ from the fingerprint saved with them (corrupted)" in printed
    assert "step 15: train loss" in printed


# In this process pytest's own hook reports the reads orbax abandons on a damaged file (launch.py drops
# them: checkpoint._quiet_abandoned_reads, tested through launch.py above).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_sole_checkpoint_is_a_clear_error(data_dir, run_copy, damage):
    for step in (5, 10, 15):
        shutil.rmtree(run_copy / "checkpoints" / f"step_{step:08d}")
    sole = run_copy / "checkpoints" / "step_00000020"
    if damage == "truncate":
        _truncate(_data_file(sole))
    elif damage == "flip":
        _flip_bytes(_data_file(sole))
    else:
        _truncate(sole / "meta" / "metadata")
    before = snapshot(run_copy / "checkpoints")
    mode, fields = ("sample", {}) if damage == "flip" else ("train", {"init_from": "resume"})
    message = refused(data_dir, run_copy, mode, **RUN_FIELDS, **fields)
    problem = {"truncate": "cannot be read", "flip": "its arrays differ from the fingerprint saved with them",
               "meta": "cannot be read"}[damage]
    for fragment in ("no usable checkpoint in", "step_00000020: " + problem, "--config.init_from=scratch"):
        assert fragment in message, message
    assert snapshot(run_copy / "checkpoints") == before


def test_a_checkpoint_of_the_format_before_orbax_resumes_exactly(data_dir, trained, run_copy):
    """state.npz + meta.json (checkpoint_npz.py) of step 15, written from the orbax checkpoint's state:
    resuming converts it and continues as the original run did, bit for bit."""
    config = tiny.get_config()
    config.update(data_dir=str(data_dir), dataset="chars", out_dir=str(run_copy), check_attention=False, **RUN_FIELDS)
    for step in (5, 10, 20):
        shutil.rmtree(run_copy / "checkpoints" / f"step_{step:08d}")
    state, meta = setup(config, quiet).restore()
    shutil.rmtree(run_copy / "checkpoints" / "step_00000015")
    checkpoint_npz.write(str(run_copy / "checkpoints" / "step_00000015"), state, meta)
    assert sorted(os.listdir(run_copy / "checkpoints" / "step_00000015")) == ["meta.json", "state.npz"]

    printed = run_here(data_dir, run_copy, **RUN_FIELDS, init_from="resume")
    assert "converted the checkpoint" in printed and "resuming from step 15 " in printed
    assert checkpoint_steps(run_copy) == [15, 20] and _intact(run_copy / "checkpoints" / "step_00000015")
    expected = losses_by_step(trained)
    assert losses_by_step(run_copy) == expected and sorted(expected) == list(range(20))


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    # The schedule of RUN (so the step is already in the XLA cache), and steps enough that the
    # run is still going when the first checkpoint appears.
    fields = dict(max_iters=300, eval_interval=25, log_interval=1, always_save_checkpoint=True, keep_checkpoints=2)
    args = [f"--config.{k}={v}" for k, v in fields.items()]
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference = start(data_dir, reference_dir, *args)  # both at once: two cores
    victim = start(data_dir, crashed_dir, *args)

    def past_a_checkpoint():  # a complete checkpoint exists and training went on after it
        steps = checkpoint_steps(crashed_dir)
        return bool(steps) and max(losses_by_step(crashed_dir), default=-1) > steps[-1] + 2

    wait_for(past_a_checkpoint, victim, what="a checkpoint")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    victim.communicate()
    killed_at = max(losses_by_step(crashed_dir))
    saved = checkpoint_steps(crashed_dir)[-1]
    print(f"killed at step {killed_at}, newest checkpoint {saved}")
    assert saved < killed_at < 299

    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    assert f"resuming from step {saved} " in run_here(data_dir, crashed_dir, **fields, init_from="resume")

    expected = losses_by_step(reference_dir)
    assert sorted(expected) == list(range(300))
    assert losses_by_step(crashed_dir) == expected  # every step's loss, bit for bit
    assert losses_by_step(crashed_dir, "val_loss") == losses_by_step(reference_dir, "val_loss")


# ---------------------------------------------------------------------------------------------
# NaN guard and signals


def test_nan_guard_stops_without_touching_checkpoints(data_dir, run_copy):
    before = snapshot(run_copy / "checkpoints")
    message = refused(data_dir, run_copy, learning_rate=1e4, max_iters=500, eval_interval=1000, log_interval=1)
    for fragment in ("the loss became", "at step", "last finite loss", "--config.learning_rate=10000.0"):
        assert fragment in message, message
    assert snapshot(run_copy / "checkpoints") == before  # byte-identical


def test_sigint_saves_a_checkpoint_at_the_current_step_and_resume_continues(data_dir, tmp_path):
    out_dir = tmp_path / "out"
    args = ["--config.eval_interval=100000", "--config.log_interval=1"]
    proc = start(data_dir, out_dir, *args, "--config.max_iters=100000")
    wait_for(lambda: max(losses_by_step(out_dir), default=-1) >= 3, proc, what="training steps")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    line = next(line for line in out.splitlines() if line.startswith("stopped by SIGINT at step"))
    step = int(line.split("at step ")[1].split(";")[0])
    assert step >= 4 and checkpoint_steps(out_dir) == [step]
    assert max(losses_by_step(out_dir)) == step - 1  # the checkpoint holds every step it logged

    printed = run_here(data_dir, out_dir, eval_interval=100000, log_interval=1, max_iters=step + 3,
                       init_from="resume")
    assert f"resuming from step {step} " in printed
    assert sorted(losses_by_step(out_dir))[-3:] == [step, step + 1, step + 2]


# ---------------------------------------------------------------------------------------------
# Preflight


def test_preflight_refuses_a_model_that_cannot_fit_before_tracing(data_dir, tmp_path, monkeypatch, capsys):
    """Refused by the analytic estimate, i.e. before anything is traced, compiled or allocated
    (what makes it take seconds; no wall-clock bound, which a busy machine could break)."""
    from haiku_gpt import experiment  # noqa: PLC0415

    def no_steps(*args, **kwargs):
        raise AssertionError("the jitted steps were built (and init traced) before the refusal")

    monkeypatch.setattr(experiment, "make_steps", no_steps)
    message = refused(data_dir, tmp_path / "out", n_layer=96, n_embd=12288)
    for fragment in ("would not fit in memory", "TiB", "(analytic estimate:", "Nothing was allocated",
                     "--config.n_layer"):
        assert fragment in message, message
    assert "shapes checked" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # nothing written either


def test_check_mode_prints_params_flops_and_memory(data_dir, tmp_path):
    printed = run_here(data_dir, tmp_path / "out", "check")
    for row in ("parameters", "0.03M", "FLOPs per step", "XLA cost analysis", "memory: arguments",
                "memory: temporaries", "memory: peak estimate", "memory available",
                "shapes checked", "init, train step, eval, decode", "ok:"):
        assert row in printed, printed
    assert not (tmp_path / "out").exists()


def test_check_mode_refuses_bad_config_clearly(data_dir, tmp_path):
    assert "unknown attention_impl 'flashy'" in refused(data_dir, tmp_path / "out", "check", attention_impl="flashy")


@pytest.fixture
def tiny_config(data_dir, tmp_path):
    config = tiny.get_config()
    config.data_dir = str(data_dir)
    config.dataset = "chars"
    config.out_dir = str(tmp_path / "out")
    config.check_attention = False
    return config


@pytest.mark.parametrize("n_kv_head", [0, 1])  # 1: grouped-query attention, traced with its shapes checked
def test_preflight_analytic_parameter_count_matches_the_model(tiny_config, n_kv_head):
    tiny_config.n_kv_head = n_kv_head
    for bias in (False, True):
        tiny_config.bias = bias
        report = preflight.check_shapes(setup(tiny_config, quiet))  # report.params: counted on the traced init
        vocab = json.loads((Path(tiny_config.data_dir) / "chars" / "meta.json").read_text())["vocab_size"]
        assert report.params == costs.param_count(model_config(tiny_config, vocab), position_embeddings=True)
        assert report.params_nanogpt == report.params - tiny_config.block_size * tiny_config.n_embd


def test_preflight_names_the_function_and_dims_of_a_shape_error(tiny_config, monkeypatch):
    kernels = importlib.import_module("haiku_gpt.kernels.attention")  # the dispatcher attention_qkv calls

    original = kernels.attention

    def transposed_attention(
        q: Float[Array, "batch q_len heads head_dim"],
        k: Float[Array, "batch k_len heads head_dim"],
        v: Float[Array, "batch k_len heads head_dim"],
        **kwargs,
    ) -> Float[Array, "batch q_len heads head_dim"]:
        return jnp.swapaxes(original(q, k, v, **kwargs), 1, 2)  # the bug: [batch, heads, q_len, head_dim]

    monkeypatch.setattr(kernels, "attention", transposed_attention)
    with pytest.raises(UserError) as e:
        preflight.check_shapes(setup(tiny_config, quiet))
    message = str(e.value)
    assert "does not trace: shape check failed in haiku_gpt.kernels.attention: the return value" in message
    assert "f32[1,2,16,16]" in message and "q_len=16" in message and "heads=2" in message


def test_preflight_reports_a_broken_shape_without_annotations(tiny_config, monkeypatch):
    kernels = importlib.import_module("haiku_gpt.kernels.attention")

    def mismatched_attention(q, k, v, **kwargs):
        return q + k[:, :-1]  # the bug: the shapes do not broadcast

    monkeypatch.setattr(kernels, "attention", mismatched_attention)
    with pytest.raises(UserError, match=r"does not trace: TypeError in kernels/attention.py:\d+ \(attention_qkv\)"):
        preflight.check_shapes(setup(tiny_config, quiet))


# ---------------------------------------------------------------------------------------------
# Checkpoints of another dataset, and bad datasets


@pytest.mark.parametrize("dataset", ["digits", "swapped"])
def test_checkpoint_from_another_vocabulary_is_refused(data_dir, trained, dataset):
    before = snapshot(trained)
    for mode, fields in (("train", {"init_from": "resume"}), ("sample", {})):
        message = refused(data_dir, trained, mode, **RUN_FIELDS, **fields, dataset=dataset)
        assert f"was trained on dataset 'chars' with another vocabulary than dataset '{dataset}'" in message
        assert "--config.dataset=chars" in message
    assert snapshot(trained) == before


def test_empty_and_too_short_datasets_are_refused(data_dir, tmp_path):
    root = tmp_path / "data"
    prepare.prepare_text("To be, or not to be: that is the question.", root / "short", "char", source="tests")
    shutil.copytree(Path(data_dir) / "chars", root / "empty")
    for split in ("train", "val"):  # the token files lost (e.g. a disk that filled up)
        (root / "empty" / f"{split}.bin").write_bytes(b"")
    for name, fragment in (("short", "has 5 tokens, too few for block_size=16"),
                           ("empty", "dataset 'empty' is not prepared")):
        for mode in ("train", "check"):
            assert fragment in refused(root, tmp_path / "out", mode, dataset=name)
