"""Training: schedule, optimizer masks, overfitting, accumulation, determinism, checkpoints, resume."""

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from haiku_gpt.configs import shakespeare_char
from haiku_gpt import checkpoint, modes, train
from haiku_gpt.config import validate
from haiku_gpt.data import BatchPrefetcher, batch_rng, open_dataset, sample_batch, train_batches
from haiku_gpt.experiment import setup
from haiku_gpt.sample import sample_from_checkpoint
from haiku_gpt.steps import make_steps
from haiku_gpt.errors import UserError
from haiku_gpt.optimizer import clip_by_global_norm, decay_mask, global_norm, lr_schedule, make_optimizer, skip_spikes


def nanogpt_get_lr(it, c):
    """nanoGPT's train.py get_lr, verbatim in logic."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def test_lr_schedule_is_nanogpts():
    c = shakespeare_char.get_config()
    schedule = lr_schedule(c)
    for it in [0, 1, 50, 99, 100, 101, 2500, 4999, 5000, 5001, 9000]:
        assert float(schedule(it)) == pytest.approx(nanogpt_get_lr(it, c), rel=1e-5)
    c.decay_lr = False
    assert float(lr_schedule(c)(1234)) == pytest.approx(c.learning_rate)


def test_wsd_and_constant_schedules():
    """WSD: warmup, learning_rate until the decay window (the last 20% of the steps after warmup),
    then linearly or as 1-sqrt down to min_lr; constant: learning_rate after the warmup."""
    c = shakespeare_char.get_config()  # warmup 100, lr_decay_iters 5000: the decay runs 4020..5000
    lr, lo = c.learning_rate, c.min_lr
    c.lr_schedule, c.wsd_decay_fraction = "wsd", 0.2
    linear = lr_schedule(c)
    c.wsd_decay_shape = "1-sqrt"
    sqrt = lr_schedule(c)
    for it, t in [(4020, 0.0), (4265, 0.25), (4510, 0.5), (4755, 0.75), (5000, 1.0)]:
        assert float(linear(it)) == pytest.approx(lr - (lr - lo) * t, rel=1e-5), it
        assert float(sqrt(it)) == pytest.approx(lr - (lr - lo) * math.sqrt(t), rel=1e-5), it
    for it in [0, 50, 99]:  # the same warmup as nanoGPT's
        assert float(linear(it)) == pytest.approx(nanogpt_get_lr(it, c), rel=1e-5)
    for it in [100, 2000, 4019]:  # stable
        assert float(linear(it)) == float(sqrt(it)) == pytest.approx(lr)
    assert float(linear(6000)) == float(sqrt(6000)) == pytest.approx(lo)
    c.lr_schedule = "constant"
    constant = lr_schedule(c)
    assert float(constant(50)) == pytest.approx(nanogpt_get_lr(50, c), rel=1e-5)
    assert [float(constant(it)) for it in (100, 5000, 9000)] == pytest.approx([lr] * 3)


@pytest.mark.parametrize("field, value, message", [
    ("lr_schedule", "linear", "is not one of cosine, wsd, constant"),
    ("wsd_decay_shape", "cosine", "is not one of linear, 1-sqrt"),
    ("wsd_decay_fraction", 0.0, "must be in (0, 1]"),
    ("lr_decay_iters", 100, "must be larger than --config.warmup_iters=100"),
    ("profile_steps", "5", "must be START,STOP with 0 <= START < STOP"),
    ("profile_steps", "10,5", "must be START,STOP with 0 <= START < STOP"),
    ("profile_steps", "a,b", "must be START,STOP with 0 <= START < STOP"),
    ("remat", "full", "is not one of none, block, dots"),
])
def test_bad_schedule_and_profile_fields_are_refused(field, value, message):
    c = shakespeare_char.get_config()
    c[field] = value
    with pytest.raises(UserError, match=re.escape(message)):
        validate(c)


@pytest.mark.parametrize("n_kv_head, message", [
    (4, "--config.n_kv_head=4 does not divide n_head=6: grouped-query attention shares each key/value head "
        "among n_head // n_kv_head query heads, so pick one of 1, 2, 3, 6 (1: multi-query attention), or 0"),
    (-1, "--config.n_kv_head=-1 does not divide n_head=6"),
])
def test_n_kv_head_must_divide_n_head(n_kv_head, message):
    c = shakespeare_char.get_config()
    c.n_kv_head = n_kv_head
    with pytest.raises(UserError, match=re.escape(message)):
        validate(c)
    for fine in (0, 1, 3, 6):
        c.n_kv_head = fine
        validate(c)


def test_grouped_query_run_trains_records_its_kv_heads_samples_and_resumes_only_alike(tiny_config):
    """n_kv_head=1 (multi-query) on the tiny config: the loss falls, the checkpoint records the K/V heads,
    sampling reads it, and resuming with another n_kv_head names the field."""
    tiny_config.n_kv_head = 1
    summary = train.train(setup(tiny_config, lambda s: None))
    evals = [r["val_loss"] for r in read_metrics(tiny_config.out_dir) if "val_loss" in r]
    assert summary["step"] == 20 and evals[-1] < evals[0]
    assert checkpoint.latest_meta(tiny_config.out_dir)["model"]["n_kv_head"] == 1
    tiny_config.init_from = "resume"
    texts = sample_from_checkpoint(setup(tiny_config, lambda s: None))
    assert len(texts) == tiny_config.sample.num_samples and all(texts)
    tiny_config.n_kv_head = 0  # = n_head = 2: another model
    with pytest.raises(UserError, match=r"n_kv_head: checkpoint 1 vs config 2"):
        train.train(setup(tiny_config, lambda s: None))


def test_checkpoints_from_before_n_kv_head_resume_as_multi_head(tiny_config):
    """A checkpoint's meta.json without n_kv_head (saved before it existed) has one K/V head per head."""
    exp = setup(tiny_config, lambda s: None)
    expected = exp.run_meta()
    old = {**expected, "model": {k: v for k, v in expected["model"].items() if k != "n_kv_head"}}
    assert expected["model"]["n_kv_head"] == tiny_config.n_head
    checkpoint.check_compatible(old, expected, tiny_config.out_dir)
    tiny_config.n_kv_head = 1
    with pytest.raises(UserError, match=r"n_kv_head: checkpoint 2 vs config 1"):
        checkpoint.check_compatible(old, setup(tiny_config, lambda s: None).run_meta(), tiny_config.out_dir)


def test_remat_gives_the_same_losses_and_reaches_the_train_step(tiny_config):
    """--config.remat=block|dots: the train step recomputes activations (a remat a block in its jaxpr) and
    its losses, dropout included, are those without: the first bit for bit, the later ones up to float32
    rounding (XLA fuses the recomputing program's reductions in another order; a dropout bit out of place
    would move the loss by ~1e-3)."""
    tiny_config.dropout = 0.1
    losses, remats = {}, {}
    for remat in ("none", "block", "dots"):
        tiny_config.remat = remat
        exp = setup(tiny_config, lambda message: None)
        state = exp.steps.init(tiny_config.seed)
        x, y = train_batches(exp.dataset.splits["train"], tiny_config.seed, 0, 3, (1, tiny_config.batch_size),
                             tiny_config.block_size)
        remats[remat] = str(jax.make_jaxpr(exp.steps.train_steps)(state, x, y)).count("remat")
        losses[remat] = np.asarray(exp.steps.train_steps(state, x, y)[1]["loss"])
    n_layer = tiny_config.n_layer  # with remat=none, the GELU's own recomputation: one remat a layer
    assert remats["none"] == n_layer and min(remats["block"], remats["dots"]) >= remats["none"] + n_layer
    for remat in ("block", "dots"):
        assert losses[remat][0] == losses["none"][0]
        np.testing.assert_allclose(losses[remat], losses["none"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [True, False])  # one reduction over the concatenation (GPU/TPU), per leaf (CPU)
@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped, and left alone
def test_global_norm_clip_is_optaxs(max_norm, fused):
    """The trainer's clip gives optax.clip_by_global_norm's updates and optax.tree.norm's norm on float32 leaves
    of several shapes; a bfloat16 leaf keeps its dtype and is summed in float32 (optax squares and sums it in
    bfloat16)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    grads = {"w": jax.random.normal(keys[0], (7, 5)), "b": jax.random.normal(keys[1], (5,)),
             "e": {"h": jax.random.normal(keys[2], (3, 2, 4))}}
    np.testing.assert_allclose(float(global_norm(grads, fused)), float(optax.tree.norm(grads)), rtol=1e-6)
    ours, _ = clip_by_global_norm(max_norm, fused).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    if max_norm < float(optax.tree.norm(grads)):
        assert float(optax.tree.norm(ours)) == pytest.approx(max_norm, rel=1e-6)
    else:
        chex.assert_trees_all_equal(ours, grads)
    mixed = {**grads, "e": {"h": grads["e"]["h"].astype(jnp.bfloat16)}}
    as_float32 = jax.tree.map(lambda x: x.astype(jnp.float32), mixed)
    np.testing.assert_allclose(float(global_norm(mixed, fused)), float(optax.tree.norm(as_float32)), rtol=1e-6)
    clipped, _ = clip_by_global_norm(max_norm, fused).update(mixed, optax.EmptyState())
    chex.assert_trees_all_equal_dtypes(clipped, mixed)


def test_skip_spikes_skips_an_outlier_and_leaves_the_optimizer_state():
    """A loss or gradient-norm outlier (z-score over the window of accepted steps) gets a zero update,
    the wrapped optimizer's state and the window stay as they were, and the skip is counted."""
    opt = skip_spikes(optax.adam(0.1), window=4, z=3.0)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for i, loss in enumerate([1.0, 1.1, 0.9, 1.05]):  # fills the window; no skipping before that
        updates, state = opt.update({"w": jnp.full(3, 0.1 + 0.01 * i)}, state, params, loss=jnp.float32(loss))
        assert float(jnp.abs(updates["w"]).sum()) > 0
    for grads, loss in [({"w": jnp.full(3, 0.11)}, 10.0),  # a loss spike
                        ({"w": jnp.full(3, 5.0)}, 1.0)]:  # a gradient-norm spike
        before = state
        updates, state = opt.update(grads, state, params, loss=jnp.float32(loss))
        assert float(jnp.abs(updates["w"]).sum()) == 0.0
        chex.assert_trees_all_equal(state.inner, before.inner)
        chex.assert_trees_all_equal((state.losses, state.grad_norms, state.accepted),
                                    (before.losses, before.grad_norms, before.accepted))
        assert int(state.skipped) == int(before.skipped) + 1
    updates, state = opt.update({"w": jnp.full(3, 0.1)}, state, params, loss=jnp.float32(1.0))  # ordinary again
    assert float(jnp.abs(updates["w"]).sum()) > 0 and int(state.accepted) == 5 and int(state.skipped) == 2


def test_a_skipped_step_advances_the_learning_rate_schedule():
    """skip_spikes: the learning rate applied at step s is the schedule's at s, however many steps were
    skipped before (issue 22: the schedule stopped on a skip, so step s got the rate of step s - skips).
    Each accepted update is checked against AdamW written out here: Adam's moments over the accepted
    gradients alone, weight decay on the matrix, times nanoGPT's get_lr(s) (warmup: the rate grows
    every step, so a lagging schedule shows)."""
    c = shakespeare_char.get_config()
    c.update(warmup_iters=10, lr_decay_iters=20, grad_clip=0.0, skip_spikes=True, spike_window=2, spike_z=1.0)
    opt = make_optimizer(c)
    params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3)}  # a matrix: decayed
    state = opt.init(params)
    pattern = np.array([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.25]], np.float32)
    mu = nu = np.zeros_like(pattern)
    accepted, skipped = 0, []
    for s, loss in enumerate([1.0, 0.99, 9.0, 0.98, 9.0, 9.0, 0.97, 0.96]):  # 9.0: a loss spike
        grads = (0.2 - 0.01 * s) * pattern  # shrinking: never a gradient-norm spike
        p = np.asarray(params["w"])
        updates, state = opt.update({"w": jnp.asarray(grads)}, state, params, loss=jnp.float32(loss))
        params = optax.apply_updates(params, updates)
        if loss > 5:
            skipped.append(s)
            np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
            continue
        accepted += 1
        mu = c.beta1 * mu + (1 - c.beta1) * grads
        nu = c.beta2 * nu + (1 - c.beta2) * grads**2
        direction = (mu / (1 - c.beta1**accepted)) / (np.sqrt(nu / (1 - c.beta2**accepted)) + 1e-8)
        direction = direction + c.weight_decay * p
        applied_lr = -np.asarray(updates["w"]) / direction  # the rate this step's update was made with
        np.testing.assert_allclose(applied_lr, nanogpt_get_lr(s, c), rtol=1e-4, err_msg=f"step {s}")
    assert skipped == [2, 4, 5] and int(state.skipped) == 3


def test_skipped_steps_are_logged_leave_the_parameters_and_resume_exactly(tiny_config, tmp_path):
    """A run with skip_spikes (a small window and z, so that some steps are skipped): each skip is a
    logged record and line; a skipped step leaves the parameters as they were (the same parameter
    norm, a zero update); a run resumed from the step-6 checkpoint skips and loses exactly as the
    uninterrupted one."""
    tiny_config.update(max_iters=12, eval_interval=6, log_interval=4, always_save_checkpoint=True,
                       skip_spikes=True, spike_window=3, spike_z=1.0)
    assert modes.run("train", tiny_config) == 0
    records = [json.loads(x) for x in open(os.path.join(tiny_config.out_dir, "metrics.jsonl"))]
    logs = {r["step"]: r for r in records if "loss" in r}
    skipped = sorted(s for s, r in logs.items() if r["skipped"])
    assert any(s < 6 for s in skipped) and any(s >= 6 for s in skipped), logs
    assert any(s % 4 for s in skipped)  # logged although not a log_interval step
    compared = [s for s in skipped if s - 1 in logs]
    assert compared, logs
    for s in compared:  # the parameters after a skipped step are the ones before it
        assert logs[s]["param_norm"] == logs[s - 1]["param_norm"] and logs[s]["update_norm"] == 0.0
    assert [logs[s]["skipped_total"] for s in skipped] == list(range(1, len(skipped) + 1))

    resumed = tmp_path / "resumed"
    shutil.copytree(os.path.join(tiny_config.out_dir, "checkpoints", "step_00000006"),
                    resumed / "checkpoints" / "step_00000006")
    tiny_config.update(out_dir=str(resumed), init_from="resume")
    assert modes.run("train", tiny_config) == 0
    again = {r["step"]: r for r in map(json.loads, open(resumed / "metrics.jsonl")) if "loss" in r}
    for s in again:
        assert (again[s]["loss"], again[s]["skipped"]) == (logs[s]["loss"], logs[s]["skipped"]), s


def test_weight_decay_only_on_matrices():
    params = {"lin": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)},
              "emb": {"embeddings": jnp.ones((5, 4))}}
    mask = decay_mask(params)
    assert mask == {"lin": {"w": True, "b": False}, "ln": {"scale": False}, "emb": {"embeddings": True}}


def test_batches_are_windows_and_reproducible(tiny_config):
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, 16)
    tokens = ds.splits["train"]
    x, y = sample_batch(tokens, batch_rng(1, "train", 7), (2, 3), 16)
    assert x.shape == y.shape == (2, 3, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # y is x shifted by one
    x2, _ = sample_batch(tokens, batch_rng(1, "train", 7), (2, 3), 16)
    x3, _ = sample_batch(tokens, batch_rng(1, "train", 8), (2, 3), 16)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)


def steps(trainer, state, tokens, seed, start, n, batch_shape, block):
    losses = []
    for s in range(start, start + n):
        x, y = train_batches(tokens, seed, s, 1, batch_shape, block)
        state, m = trainer.train_steps(state, x, y)
        losses.append(float(m["loss"][0]))
    return state, losses


def test_overfits_one_batch(tiny_config):
    tiny_config.learning_rate = 3e-3
    tiny_config.decay_lr = False
    tiny_config.check_attention = False
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, 16)
    trainer = make_steps(tiny_config, ds.vocab_size)
    state = trainer.init(0)
    x, y = train_batches(ds.splits["train"], 0, 0, 1, (1, 4), 16)
    first = None
    for _ in range(150):
        state, m = trainer.train_steps(state, x, y)
        first = first if first is not None else float(m["loss"][0])
    assert first > 3.0 and float(m["loss"][0]) < 0.2


def test_gradient_accumulation_matches_big_batch(tiny_config):
    tiny_config.check_attention = False
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, 16)
    x, y = train_batches(ds.splits["train"], 0, 0, 1, (2, 4), 16)
    tiny_config.gradient_accumulation_steps = 2
    acc = make_steps(tiny_config, ds.vocab_size)
    s_acc, m_acc = acc.train_steps(acc.init(0), x, y)
    tiny_config.gradient_accumulation_steps = 1
    tiny_config.batch_size = 8
    big = make_steps(tiny_config, ds.vocab_size)
    s_big, m_big = big.train_steps(big.init(0), x.reshape(1, 1, 8, 16), y.reshape(1, 1, 8, 16))
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_acc.params, s_big.params)


def test_scanned_steps_equal_single_steps(tiny_config):
    tiny_config.check_attention = False
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, 16)
    trainer = make_steps(tiny_config, ds.vocab_size)
    _, single = steps(trainer, trainer.init(0), ds.splits["train"], 0, 0, 4, (1, 4), 16)
    x, y = train_batches(ds.splits["train"], 0, 0, 4, (1, 4), 16)
    _, m = trainer.train_steps(trainer.init(0), x, y)
    np.testing.assert_allclose(np.asarray(m["loss"]), single, rtol=1e-6)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_loop_logs_evaluates_checkpoints_and_is_deterministic(tiny_config, tmp_path):
    summary = train.train(setup(tiny_config, lambda s: None))
    records = read_metrics(tiny_config.out_dir)
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in logs] == [0, 5, 10, 15]
    assert set(logs[0]) == {"step", "loss", "lr", "grad_norm", "update_norm", "param_norm", "dt_ms",
                            "tokens_per_sec", "mfu"}
    assert [r["step"] for r in evals] == [0, 10, 20] and set(evals[0]) == {"step", "train_loss", "val_loss"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert os.path.getsize(os.path.join(tiny_config.out_dir, "loss.png")) > 1000
    assert checkpoint.list_checkpoints(tiny_config.out_dir)
    assert summary["step"] == 20

    tiny_config.out_dir = str(tmp_path / "again")
    train.train(setup(tiny_config, lambda s: None))
    again = [r["loss"] for r in read_metrics(tiny_config.out_dir) if "loss" in r]
    assert again == [r["loss"] for r in logs]  # same seed, same losses, bit for bit


def test_resume_continues_exactly(tiny_config, tmp_path):
    tiny_config.always_save_checkpoint = True
    tiny_config.log_interval = 1
    full_dir = tiny_config.out_dir
    train.train(setup(tiny_config, lambda s: None))
    full = {r["step"]: r["loss"] for r in read_metrics(full_dir) if "loss" in r}

    tiny_config.out_dir = str(tmp_path / "split")
    tiny_config.max_iters = 10  # stop at the step-10 checkpoint...
    train.train(setup(tiny_config, lambda s: None))
    saved = Path(tiny_config.out_dir) / "checkpoints" / "step_00000010"
    before = {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()}
    tiny_config.max_iters = 20  # ...then resume to 20 (changing max_iters is allowed)
    tiny_config.init_from = "resume"
    train.train(setup(tiny_config, lambda s: None))
    # The resumed step is not saved again (always_save_checkpoint): its checkpoint was never replaced.
    assert {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()} == before
    resumed = {r["step"]: r["loss"] for r in read_metrics(tiny_config.out_dir) if "loss" in r}
    assert resumed == full


def test_resume_with_other_model_shape_names_the_fields(tiny_config):
    train.train(setup(tiny_config, lambda s: None))
    tiny_config.init_from = "resume"
    tiny_config.n_embd = 48
    tiny_config.n_layer = 3
    with pytest.raises(UserError, match=r"n_layer: checkpoint 2 vs config 3.*n_embd: checkpoint 32 vs config 48"):
        train.train(setup(tiny_config, lambda s: None))


def test_nan_loss_stops_with_clear_error(tiny_config):
    tiny_config.learning_rate = 1e4
    tiny_config.min_lr = 1e3
    tiny_config.grad_clip = 0.0
    tiny_config.warmup_iters = 0
    tiny_config.max_iters = 200
    tiny_config.eval_interval = 1000
    with pytest.raises(UserError, match="the loss became nan at step"):
        train.train(setup(tiny_config, lambda s: None))


def test_check_attention_runs_both_paths(tiny_config, monkeypatch):
    """In a real run the chosen path and the reference both run in every step and are compared:
    agreeing paths train normally; a 1% error in the chosen path stops the run, naming the layer."""
    tiny_config.attention_impl = "xla"
    tiny_config.check_attention = True
    tiny_config.max_iters = 3
    summary = train.train(setup(tiny_config, lambda s: None))
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])

    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    tiny_config.out_dir += "-broken"
    with pytest.raises(AssertionError, match=r"disagrees with the reference attention in layer gpt/h_0/attn"):
        train.train(setup(tiny_config, lambda s: None))


def test_steps_per_call_gives_the_same_run_without_recompiling(tiny_config, tmp_path):
    tiny_config.check_attention = False
    train.train(setup(tiny_config, lambda s: None))
    single = [r for r in read_metrics(tiny_config.out_dir) if "loss" in r]
    tiny_config.out_dir = str(tmp_path / "scanned")
    tiny_config.steps_per_call = 3  # 10-step eval intervals: scans of 3 and single steps
    lines = []
    train.train(setup(tiny_config, lines.append))
    scanned = [r for r in read_metrics(tiny_config.out_dir) if "loss" in r]
    assert [r["step"] for r in scanned] == [r["step"] for r in single]
    np.testing.assert_allclose([r["loss"] for r in scanned], [r["loss"] for r in single], rtol=1e-6)
    assert not [line for line in lines if "compiled again" in line]


def test_cpu_matmul_library_choice_reaches_the_compiled_step(tiny_config):
    """'auto' keeps YNNPACK for small models and Eigen for large ones; the option really is compiled in."""
    from haiku_gpt.system import YNNPACK_MAX_ACTIVATIONS, cpu_compiler_options
    assert cpu_compiler_options("auto", 768, 128) is None  # the CPU recipe
    eigen = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert cpu_compiler_options("auto", 16384, 384) == eigen  # shakespeare_char
    assert cpu_compiler_options("auto", YNNPACK_MAX_ACTIVATIONS + 1, 1) == eigen
    assert cpu_compiler_options("ynnpack", 16384, 384) is None
    assert cpu_compiler_options("eigen", 768, 128) == eigen

    def compiled_text(library):
        tiny_config.cpu_matmul_library = library
        trainer = make_steps(tiny_config, 65)
        state = trainer.init(0)
        x = jnp.zeros((1, 1, tiny_config.batch_size, tiny_config.block_size), jnp.int32)
        return trainer.train_steps.lower(state, x, x).compile().as_text()

    tiny_config.check_attention = False
    assert "__ynn_fusion" in compiled_text("ynnpack")
    assert "__ynn_fusion" not in compiled_text("eigen")
    tiny_config.cpu_matmul_library = "mkl"
    with pytest.raises(UserError, match="cpu_matmul_library='mkl' is not one of auto, ynnpack, eigen"):
        validate(tiny_config)


def test_bfloat16_training_computes_in_bfloat16_keeps_float32_params_and_tracks_float32(tiny_config):
    """--config.dtype=bfloat16: the step's matmuls run in bfloat16, the parameters and AdamW state stay
    float32 (mixed precision), and 8 steps follow the float32 run's losses to bfloat16 precision."""
    tiny_config.check_attention = False
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, 16)
    x, y = train_batches(ds.splits["train"], 0, 0, 8, (1, 4), 16)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        tiny_config.dtype = dtype
        fns = make_steps(tiny_config, ds.vocab_size)
        hlo = fns.train_steps.lower(fns.init(0), x, y).as_text()
        state, metrics = fns.train_steps(fns.init(0), x, y)
        losses[dtype] = np.asarray(metrics["loss"])
        assert ("bf16" in hlo) == (dtype == "bfloat16")
        assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))} <= {
            jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert not np.array_equal(losses["bfloat16"], losses["float32"])  # really another precision
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


def test_the_host_share_of_a_char_recipe_step_is_under_a_millisecond(data_dir):
    """What the training loop's own thread does per step for shakespeare_char (batch 64 x 256): take the
    prefetched batch (drawn and put on the device by data.BatchPrefetcher's thread) and dispatch the step,
    with the real state (every parameter and AdamW moment donated) and the device work stubbed to nothing.
    That thread's CPU time per step is under 1 ms (~0.4 ms on an idle 2-core CPU), so the host cannot hold a GPU
    step of ~10 ms back. CPU time, bounded at the 10th percentile of 200 steps: the suite's other workers share
    these cores, which stretches most steps' CPU time (caches, frequency) without changing the work."""
    config = shakespeare_char.get_config()
    config.update(data_dir=data_dir, dataset="chars", vocab_size=65)
    exp = setup(config, lambda message: None)
    state = exp.steps.init(config.seed)
    stub = jax.jit(lambda state, x, y: (state, {"loss": jnp.zeros((x.shape[0],))}), donate_argnums=0)
    shape = (config.gradient_accumulation_steps, config.batch_size)

    def device_batches(first, k):
        return exp.steps.shard_batch(*train_batches(exp.dataset.splits["train"], config.seed, first, k, shape,
                                                     config.block_size))

    host = []
    with BatchPrefetcher(device_batches, lambda step: 1, 0, 260) as batches:
        for step in range(260):
            started = time.thread_time()
            x, y = batches.get(step, 1)
            state, metrics = stub(state, x, y)
            host.append(time.thread_time() - started)
            jax.block_until_ready(metrics)
            time.sleep(0.003)  # the device's work on the step, during which the prefetcher draws the next
    p10, median = np.percentile(host[60:], [10, 50])
    assert p10 < 1e-3, f"host CPU time per step: p10 {p10 * 1e3:.2f} ms, median {median * 1e3:.2f} ms"
