"""What a training run logs: the norms are the real ones, and TensorBoard's event files and the
(offline) wandb run hold exactly what metrics.jsonl holds."""

import json
import struct
import types
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from haiku_gpt import checkpoint, costs, modes
from haiku_gpt.data import train_batches
from haiku_gpt.experiment import setup
from haiku_gpt.model import make_model
from haiku_gpt.steps import make_loss_fn
from tests.conftest import quiet

STEPS = 4


def read_event_scalars(out_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in out_dir's TensorBoard event files: TFRecords (length, its crc, an Event proto,
    its crc), read without TensorBoard."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(out_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {out_dir}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A tiny run, a checkpoint after every step, logged to TensorBoard and to an offline wandb run,
    with a profile of step 1."""
    from haiku_gpt.configs import tiny

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    config = tiny.get_config()
    config.update(data_dir=data_dir, dataset="chars", out_dir=str(tmp_path_factory.mktemp("metrics") / "out"),
                  max_iters=STEPS, eval_interval=1, log_interval=1, always_save_checkpoint=True,
                  keep_checkpoints=STEPS + 1, grad_clip=0.05, wandb_log=True, lr_schedule="wsd",
                  profile_steps="1,2")
    try:
        assert modes.run("train", config) == 0
    finally:
        mp.undo()
    out_dir = Path(config.out_dir)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return config, out_dir, records


def params_at(checkpoints: checkpoint.Checkpoints, step: int, target):
    """The parameters saved at `step`."""
    return checkpoints.read(step, target)[0].params


def test_norms_are_the_gradient_before_clipping_the_update_and_the_parameters(run):
    config, out_dir, records = run
    logs = {r["step"]: r for r in records if "loss" in r}
    assert sorted(logs) == list(range(STEPS))
    exp = setup(config, quiet)
    target = exp.steps.restore_target()
    loss_fn = make_loss_fn(make_model(exp.model_config), exp.config.dtype)  # setup resolved dtype=auto
    dataset = exp.dataset
    grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=4)  # one compile for the three steps, not op by op
    with checkpoint.Checkpoints(str(out_dir)) as checkpoints:
        for step in range(1, STEPS):
            before, after = params_at(checkpoints, step, target), params_at(checkpoints, step + 1, target)
            x, y = train_batches(dataset.splits["train"], config.seed, step, 1, (1, config.batch_size),
                                 config.block_size)
            grads = grad_fn(before, None, x[0, 0], y[0, 0], True)
            record = logs[step]
            assert record["grad_norm"] == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
            assert record["grad_norm"] > config.grad_clip  # logged before clipping: clipping was active
            update = jax.tree.map(lambda a, b: a - b, after, before)
            assert record["update_norm"] == pytest.approx(float(optax.tree.norm(update)), rel=1e-3)
            assert record["param_norm"] == pytest.approx(float(optax.tree.norm(after)), rel=1e-5)


def test_tensorboard_events_hold_what_metrics_jsonl_holds(run):
    _, out_dir, records = run
    scalars = read_event_scalars(out_dir)
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                expected.setdefault(name, {})[record["step"]] = value
    assert set(scalars) == set(expected) >= {"loss", "lr", "grad_norm", "param_norm", "update_norm",
                                              "tokens_per_sec", "mfu", "train_loss", "val_loss"}
    for name, by_step in expected.items():
        assert sorted(scalars[name]) == sorted(by_step), name
        for step, value in by_step.items():
            assert scalars[name][step] == pytest.approx(value, rel=1e-6), (name, step)  # float32 in the file


def read_wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows of an offline wandb run's .wandb file, by step: a LevelDB-style log (a
    ':W&B' header, 32 KiB blocks of records with a crc32/length/type header; FULL=1, FIRST=2,
    MIDDLE=3, LAST=4) of wandb Record protos, read without wandb's service."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    chunks, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a record header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            chunks.append(pending)
            pending = b""
    rows = {}
    for chunk in chunks:
        record = wandb_internal_pb2.Record.FromString(chunk)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["_step"]] = row
    return rows


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(run):
    config, out_dir, records = run
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")  # WANDB_MODE=offline, under out_dir
    rows = read_wandb_history(run_dir)
    assert sorted(rows) == sorted({r["step"] for r in records})
    for record in records:  # a step's log and eval records share one wandb row
        for name, value in record.items():
            if name != "step":
                assert rows[record["step"]][name] == pytest.approx(value, rel=1e-12), (name, record["step"])


def test_wsd_schedule_reaches_the_step(run):
    """--config.lr_schedule=wsd through a run: the logged learning rates are WSD's, written out here
    (not lr_schedule's own values): nanoGPT's linear warmup, then learning_rate (the decay starts at
    lr_decay_iters - wsd_decay_fraction * (lr_decay_iters - warmup_iters), after this run's steps)."""
    config, _, records = run
    lr, warmup = config.learning_rate, config.warmup_iters
    assert 0 < warmup < STEPS < config.lr_decay_iters - config.wsd_decay_fraction * (config.lr_decay_iters - warmup)
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(logged) == list(range(STEPS))
    for step, value in logged.items():
        assert value == pytest.approx(lr * (step + 1) / (warmup + 1) if step < warmup else lr, rel=1e-6), step


def test_profile_steps_writes_a_trace_of_those_steps(run):
    """--config.profile_steps=1,2: TensorBoard's profile (xplane) and a Perfetto trace in out_dir/profile,
    holding the train step's dispatches."""
    import gzip

    _, out_dir, _ = run
    (xplane,) = (out_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb")
    assert xplane.stat().st_size > 0
    (perfetto,) = (out_dir / "profile" / "plugins" / "profile").glob("*/perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    names = {e.get("name") for e in (events["traceEvents"] if isinstance(events, dict) else events)}
    assert "PjitFunction(train_steps)" in names, sorted(n for n in names if n and "Pjit" in n)


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H200", "bfloat16", 989.4), ("NVIDIA H200 NVL", "bfloat16", 835.5),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5), ("NVIDIA H100 NVL", "float32", 417.5),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312), ("NVIDIA A100 80GB PCIe", "float32", 156),
    ("NVIDIA L4", "bfloat16", 121), ("NVIDIA L40S", "bfloat16", None),
    ("TPU v4", "bfloat16", 275), ("TPU v5 lite", "bfloat16", 197), ("TPU v5", "bfloat16", 459),
    ("TPU v5p", "float32", 459), ("TPU v6 lite", "bfloat16", 918), ("cpu", "float32", None),
])
def test_peak_flops_come_from_the_datasheet_table(kind, dtype, tflops, monkeypatch):
    """Known device kinds get their dense datasheet peak for the dtype (float32: TF32 on NVIDIA, bf16 passes on
    TPU), so MFU cannot pass 100% from a wrong yardstick; unknown kinds (a CPU, an L40S) are measured."""
    assert costs.datasheet_peak_flops(kind, dtype) == (tflops and tflops * 1e12)
    device = types.SimpleNamespace(device_kind=kind)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    monkeypatch.setattr(costs, "measure_peak_flops", lambda dtype: 123e9)
    peak, source = costs.peak_flops(0.0, dtype)
    assert (peak, "datasheet" in source) == ((tflops * 1e12, True) if tflops else (123e9, False))
    assert costs.peak_flops(5e12, dtype) == (5e12, "configured")



def test_loss_plot_draws_at_most_every_interval_from_the_start_and_at_the_end(tmp_path, monkeypatch):
    from haiku_gpt import metrics  # noqa: PLC0415

    drawn = []
    monkeypatch.setattr(metrics, "plot_losses", lambda out_dir, records: drawn.append(len(records)))
    clock = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    writer = metrics.MetricsWriter(str(tmp_path))
    with writer, metrics.LossPlot(writer, every_s=60.0) as plot:
        for step, seconds in ((0, 0.5), (10, 30.0), (20, 59.0), (30, 61.0), (40, 70.0), (50, 120.0), (60, 125.0),
                              (70, 130.0)):
            clock[0] = seconds
            writer.write({"step": step, "train_loss": 1.0, "val_loss": 1.0})
            plot.evaluated()
    # Step 30: 61 s after the start. Step 50 is 59 s after that drawing, step 60 is 64 s. The end: step 70.
    assert drawn == [4, 7, 8]

    drawn.clear()  # a run shorter than the interval: one drawing, at the end
    (tmp_path / "short").mkdir()
    writer = metrics.MetricsWriter(str(tmp_path / "short"))
    with writer, metrics.LossPlot(writer, every_s=60.0) as plot:
        for step in (0, 10, 20):
            writer.write({"step": step, "train_loss": 1.0, "val_loss": 1.0})
            plot.evaluated()
    assert drawn == [3]

    drawn.clear()
    with metrics.LossPlot(metrics.MetricsWriter(str(tmp_path), enabled=False)) as plot:
        plot.evaluated()  # another process than process 0: no drawing
    assert drawn == []
