"""Data parallelism, fsdp, multi-process runs and checkpoints across device counts.

Each run on several devices is a separate `launch.py` process (through a small driver that also records
every step's loss on every process), with fake CPU devices from
`XLA_FLAGS=--xla_force_host_platform_device_count=N`: JAX reads that flag once, at start-up. A run on
one device is launch.py's work (`modes.run`) in the pytest process, which has one CPU device: a process
would only add the imports of JAX, haiku and orbax.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from haiku_gpt.configs import tiny
from haiku_gpt.distributed import DataParallel
from tests.conftest import run_printed

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
SHORT = 10  # the two-process run (the learning-rate schedule does not depend on max_iters)
RTOL = 1e-5

# Runs launch.py's main and then prints this process's per-step losses (non-zero processes log nothing).
DRIVER = r'''
import dataclasses, json, os, sys
repo = sys.argv[1]
sys.path.insert(0, repo)
sys.argv = [os.path.join(repo, "launch.py")] + sys.argv[2:]
import jax
import numpy as np
from absl import app
import launch
from haiku_gpt import experiment

losses = {}
shards = {}  # parameter path -> [full shape, the shape device 0 holds], after the first step
make_steps = experiment.make_steps

def recording_make_steps(*args, **kwargs):
    trainer = make_steps(*args, **kwargs)
    def train_steps(state, x, y):
        if isinstance(state.step, jax.core.Tracer):  # traced (the preflight): nothing to record
            return trainer.train_steps(state, x, y)
        step = int(state.step)
        state, metrics = trainer.train_steps(state, x, y)
        for i, loss in enumerate(np.asarray(metrics["loss"])):
            losses[step + i] = float(loss)
        if not shards:
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
                shards[jax.tree_util.keystr(path)] = [list(leaf.shape), list(leaf.addressable_shards[0].data.shape)]
        return state, metrics
    return dataclasses.replace(trainer, train_steps=train_steps)

experiment.make_steps = recording_make_steps
code = 0
try:
    app.run(launch.main, flags_parser=launch._parse_flags)
except SystemExit as e:
    code = e.code
print("LOSSES " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "losses": sorted(losses.items()), "shards": shards}), flush=True)
sys.exit(code)
'''


def _env(devices: int, cache_dir) -> dict:
    # A compilation cache shared by the runs: runs on the same device count reuse each other's executables.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _args(data_dir, out_dir, *extra) -> list[str]:
    return ["--config=" + str(REPO / "configs" / "tiny.py"), f"--config.data_dir={data_dir}",
            "--config.dataset=chars", f"--config.out_dir={out_dir}", "--config.check_attention=False",
            "--config.batch_size=8", "--config.log_interval=1", f"--config.max_iters={STEPS}",
            "--config.always_save_checkpoint=True", "--config.keep_checkpoints=5", *extra]


def _run_here(args) -> dict:
    """`launch.py ARGS` on one device, in this process: `_args`' --config.<field>=<value> flags (and --mode)
    applied to configs/tiny.py. Its losses are metrics.jsonl's (every step is logged)."""
    config, mode = tiny.get_config(), "train"
    for arg in args:
        key, value = arg.removeprefix("--").split("=", 1)
        if key == "config":
            assert Path(value).name == "tiny.py", value
        elif key == "mode":
            mode = value
        elif key.startswith("config."):
            field = key.removeprefix("config.")
            old = config[field]
            assert isinstance(old, (bool, int, float, str)), (field, old)  # what absl's parser would do
            if isinstance(old, bool):
                assert value in ("True", "False"), arg
            config[field] = value == "True" if isinstance(old, bool) else type(old)(value)
    rc, printed = run_printed(mode, config)
    losses = _metric_losses(config.out_dir) if mode == "train" else None
    return {"rc": rc, "stdout": printed, "stderr": "", "losses": losses,
            "process": jax.process_index(), "devices": jax.device_count()}


def _start(driver, devices, args):
    return subprocess.Popen([sys.executable, str(driver), str(REPO), *args], env=_env(devices, driver.parent / "jax-cache"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=150) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"run timed out\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    result = {"rc": proc.returncode, "stdout": out, "stderr": err, "losses": None}
    for line in out.splitlines():
        if line.startswith("LOSSES "):
            record = json.loads(line[len("LOSSES "):])
            result.update(process=record["process"], devices=record["devices"],
                          losses={int(s): v for s, v in record["losses"]}, shards=record["shards"])
    return result


def _ok(result) -> dict:
    assert result["rc"] == 0, f"stdout:\n{result['stdout'][-3000:]}\nstderr:\n{result['stderr'][-3000:]}"
    return result


def _metric_losses(out_dir) -> dict[int, float]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _max_rel(a: dict, b: dict, steps) -> float:
    x, y = np.array([a[s] for s in steps]), np.array([b[s] for s in steps])
    return float(np.max(np.abs(x - y) / np.abs(y)))


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """run(name, devices, *flags): one launch.py run per name, cached for the module."""
    root = tmp_path_factory.mktemp("distributed")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    cache = {}

    def run(name, devices, *extra, out_dir=None):
        if name not in cache:
            out_dir = out_dir or root / name
            args = _args(data_dir, out_dir, *extra)
            result = _ok(_run_here(args) if devices == 1 else _finish(_start(driver, devices, args)))
            assert result["devices"] == devices
            cache[name] = dict(result, out_dir=out_dir)
        return cache[name]

    run.root, run.driver, run.data_dir = root, driver, data_dir
    return run


def test_fsdp_shards_the_largest_divisible_dimension():
    dp = DataParallel(AbstractMesh((4,), ("data",)), fsdp=True)
    assert dp.param_spec((65, 32)) == PartitionSpec(None, "data")  # 65 does not divide by 4: next largest
    assert dp.param_spec((128, 32)) == PartitionSpec("data", None)
    assert dp.param_spec((6,)) == PartitionSpec() and dp.param_spec(()) == PartitionSpec()  # replicated
    assert DataParallel(AbstractMesh((4,), ("data",))).param_spec((128, 32)) == PartitionSpec()


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_four_devices_match_one_device(runs, fsdp):
    one = runs("one_device", 1)
    four = runs(f"four_devices_{'fsdp' if fsdp else 'replicated'}", 4, f"--config.fsdp={fsdp}")
    steps = range(STEPS)
    assert sorted(one["losses"]) == sorted(four["losses"]) == list(steps)
    rel = _max_rel(four["losses"], one["losses"], steps)
    print(f"4 devices ({'fsdp' if fsdp else 'replicated'}) vs 1: max relative loss difference {rel:.2e}")
    assert rel < RTOL
    assert _max_rel(_metric_losses(four["out_dir"]), _metric_losses(one["out_dir"]), steps) < RTOL
    # The parameters' real layout after a step: fsdp splits each one that has a dimension the 4
    # devices divide (device 0 holds a quarter), replicated keeps a whole copy everywhere.
    shards = four["shards"]
    assert shards and all(len(full) == len(local) for full, local in shards.values())
    for path, (full, local) in shards.items():
        divisible = any(d >= 4 and d % 4 == 0 for d in full)
        expected = np.prod(full) // 4 if fsdp and divisible else np.prod(full)
        assert np.prod(local) == expected, (path, full, local)
    assert any(np.prod(local) < np.prod(full) for full, local in shards.values()) == fsdp


@pytest.mark.parametrize("first,last", [(False, True), (True, False)], ids=["4->1->4fsdp", "4fsdp->1->4"])
def test_checkpoint_resumes_on_another_device_count(runs, first, last):
    """4 devices -> 1 -> 4, across fsdp and replication: every process wrote its own shards (orbax),
    and each resume reads them into its own layout. The losses are those of one uninterrupted run."""
    one = runs("one_device", 1)
    source = runs(f"four_devices_{'fsdp' if first else 'replicated'}", 4, f"--config.fsdp={first}")
    out_dir = runs.root / f"resume_chain_{'fsdp' if first else 'replicated'}"
    shutil.copytree(Path(source["out_dir"]) / "checkpoints" / "step_00000010",
                    out_dir / "checkpoints" / "step_00000010")
    middle = runs(out_dir.name + "_1", 1, "--config.init_from=resume", "--config.max_iters=15", out_dir=out_dir)
    last_run = runs(out_dir.name + "_4", 4, "--config.init_from=resume", f"--config.fsdp={last}", out_dir=out_dir)
    assert "resuming from step 10" in middle["stdout"] and "resuming from step 15" in last_run["stdout"]
    assert sorted(middle["losses"]) == list(range(10, 15)) and sorted(last_run["losses"]) == list(range(15, STEPS))
    resumed = {**middle["losses"], **last_run["losses"]}
    rel = _max_rel(resumed, one["losses"], range(10, STEPS))
    print(f"checkpoint of 4 devices (fsdp={first}) -> 1 device -> 4 devices (fsdp={last}) vs uninterrupted: "
          f"max relative difference {rel:.2e}")
    assert rel < RTOL
    shards = last_run["shards"]  # the last run really is laid out as asked
    assert any(np.prod(local) < np.prod(full) for full, local in shards.values()) == last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_and_match_one_process(runs):
    one = runs("one_device", 1)
    out_dir = runs.root / "two_processes"
    address = f"127.0.0.1:{_free_port()}"
    args = _args(runs.data_dir, out_dir, "--config.fsdp=True", f"--config.max_iters={SHORT}",
                 "--config.eval_interval=5", f"--coordinator_address={address}", "--num_processes=2")
    procs = [_start(runs.driver, 2, [*args, f"--process_id={i}"]) for i in range(2)]
    try:
        results = [_ok(_finish(p)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    p0, p1 = results
    assert (p0["process"], p1["process"]) == (0, 1) and p0["devices"] == p1["devices"] == 4
    assert p0["losses"] == p1["losses"]  # the same replicated values, bit for bit
    assert sorted(p0["losses"]) == list(range(SHORT))
    rel = _max_rel(p0["losses"], one["losses"], range(SHORT))
    print(f"2 processes x 2 devices vs 1 device: max relative loss difference {rel:.2e}")
    print("process 0 printed:\n" + "\n".join(l for l in p0["stdout"].splitlines() if not l.startswith("LOSSES")))
    assert rel < RTOL
    assert f"iter {SHORT - 1}: loss" in p0["stdout"] and "saved checkpoint" in p0["stdout"]
    assert "iter" not in p1["stdout"] and "checkpoint" not in p1["stdout"]  # only process 0 logs
    assert sorted(_metric_losses(out_dir)) == list(range(SHORT))  # written once, by process 0
    assert sorted(os.listdir(out_dir / "checkpoints")) == ["step_00000005", "step_00000010"]
    # Each process wrote the shards its own devices hold (fsdp: no process holds a whole array).
    state_dir = out_dir / "checkpoints" / "step_00000010" / "state"
    assert sorted(p.name for p in state_dir.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]


def test_export_from_two_processes_matches_one_process(runs):
    """--mode=export of an fsdp checkpoint restored over 2 processes x 2 devices (no process holds a whole
    array) writes the same files as an export in one process."""
    source = runs("four_devices_fsdp", 4, "--config.fsdp=True")
    exports = {}
    for name, processes in (("one", 1), ("two", 2)):
        out_dir = runs.root / f"export_{name}"
        shutil.copytree(Path(source["out_dir"]) / "checkpoints", out_dir / "checkpoints")
        args = _args(runs.data_dir, out_dir, "--mode=export", "--config.fsdp=True")
        if processes == 1:
            _ok(_run_here(args))
        else:
            args += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
            procs = [_start(runs.driver, 2, [*args, f"--process_id={i}"]) for i in range(processes)]
            try:
                for p in procs:
                    _ok(_finish(p))
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        exports[name] = {f: (out_dir / "hf" / f).read_bytes() for f in ("model.safetensors", "config.json")}
    assert exports["one"]["model.safetensors"] == exports["two"]["model.safetensors"]
    assert len(exports["one"]["model.safetensors"]) > 10_000


def test_batch_must_divide_by_device_count(runs):
    proc = _start(runs.driver, 4, _args(runs.data_dir, runs.root / "bad_batch", "--config.batch_size=6"))
    result = _finish(proc)
    assert result["rc"] == 2
    assert "--config.batch_size=6" in result["stderr"] and "4 devices" in result["stderr"]


def test_two_processes_with_the_default_config(runs):
    """`python launch.py` with no --config on two processes: configs/default.py picks its recipe without
    starting JAX's backend, so `jax.distributed.initialize` (which must come first) still can."""
    address = f"127.0.0.1:{_free_port()}"
    # The default recipe at a smaller width and depth (the flags override fields of the config it picks; the
    # recipe is still chosen, and named, by configs/default.py): 4x128 took ~6 s longer to trace and compile.
    args = [f"--config.data_dir={runs.data_dir}", "--config.dataset=chars", "--config.max_iters=0",
            "--config.eval_iters=2", "--config.n_layer=1", "--config.n_head=2", "--config.n_embd=32",
            f"--config.out_dir={runs.root / 'default_config'}",
            f"--coordinator_address={address}", "--num_processes=2"]
    procs = [_start(runs.driver, 1, [*args, f"--process_id={i}"]) for i in range(2)]
    try:
        p0, p1 = [_ok(_finish(p)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert (p0["process"], p1["process"]) == (0, 1) and p0["devices"] == p1["devices"] == 2
    assert "config: shakespeare_char_cpu (default: no GPU/TPU found)" in p0["stdout"]
    assert "step 0: train loss" in p0["stdout"] and "step 0" not in p1["stdout"]
