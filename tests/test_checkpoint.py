"""checkpoint.py on its own: retention, fingerprints, conversion of the format before orbax, no pickle.

Small pytrees on one CPU device, no model: what a training run adds (exact resume, kill -9, signals,
damaged files, other device counts) is tested through launch.py in test_reliability.py and
test_distributed.py.
"""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt import checkpoint, checkpoint_npz
from haiku_gpt.errors import UserError


def make_state(seed: int = 0, half: bool = True) -> dict:
    """A small state with a leaf of each dtype a TrainingState holds; `half`: with a bfloat16 leaf (which
    the format before orbax could not hold: npz stores it as raw bytes)."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
    if half:
        params["half"] = jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)
    return {"params": params, "step": jnp.int32(seed), "rng": jnp.asarray([seed, 7], jnp.uint32),
            "ok": jnp.bool_(True)}


def target_of(state) -> dict:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)


def assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def steps_on_disk(out_dir) -> list[int]:
    return [int(os.path.basename(p).split("_")[1]) for p in checkpoint.list_checkpoints(str(out_dir))]


def test_keeps_the_newest_and_the_best_and_restores_the_newest(tmp_path):
    """Each save in a manager of its own, as runs resumed one after another: the best is known from disk."""
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5, 6: 4.0}  # None: a save on a signal, without an eval
    for step, val_loss in losses.items():
        with checkpoint.Checkpoints(str(tmp_path), keep=2) as checkpoints:
            checkpoints.save(step, make_state(step), {"run": "test"}, val_loss)
    assert steps_on_disk(tmp_path) == [2, 5, 6]  # the best (1.0) and the newest two
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        state, meta = checkpoints.restore(target_of(make_state()))
    assert_same(state, make_state(6))
    assert meta["step"] == 6 and meta["val_loss"] == 4.0 and meta["run"] == "test"
    assert checkpoint.latest_meta(str(tmp_path))["step"] == 6


@pytest.mark.parametrize("leaf", ["params/w", "params/half", "step", "rng", "ok"])
def test_fingerprint_changes_with_any_single_element(leaf):
    state = make_state(3)
    before = np.asarray(checkpoint.fingerprint(state))
    outer, _, inner = leaf.partition("/")
    x = np.array(state[outer][inner] if inner else state[outer])
    flat = x.reshape(-1)
    flat[-1] = {np.dtype(bool): lambda v: not v, np.dtype(np.uint32): lambda v: v + 1,
                np.dtype(np.int32): lambda v: v + 1}.get(x.dtype, lambda v: -v if v else 1)(flat[-1])
    changed = jnp.asarray(flat.reshape(x.shape), x.dtype)
    if inner:
        state[outer] = dict(state[outer], **{inner: changed})
    else:
        state[outer] = changed
    after = np.asarray(checkpoint.fingerprint(state))
    assert (before != after).sum() == 1  # exactly the changed leaf's fingerprint moved


def test_fingerprint_is_the_same_on_the_host_and_on_the_device():
    """The CPU path sums in numpy, in place; GPUs and TPUs use one jitted reduction: a checkpoint moves
    between them, so both must give the same numbers (and the plain modular sum of the bits)."""
    leaves = jax.tree.leaves(make_state(5))
    expected = [int(np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}").astype(np.uint64).sum()) % 2**32
                for x in leaves]
    assert checkpoint.fingerprint(leaves) == expected
    assert [int(v) for v in np.asarray(checkpoint._device_sums(leaves))] == expected


def test_a_checkpoint_without_a_usable_state_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint found in .*: train first"):
        with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
            checkpoints.restore(target_of(make_state()))
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        checkpoints.save(1, make_state(1), {}, 1.0)
    wrong = dict(make_state(), params={"w": jnp.zeros((4, 4))})  # another model's shapes
    with pytest.raises(UserError, match=r"no usable checkpoint in .*step_00000001: cannot be read"):
        with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
            checkpoints.restore(target_of(wrong))


def test_checkpoints_of_the_format_before_orbax_are_converted_on_load(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10):
        checkpoint_npz.write(str(root / f"step_{step:08d}"), make_state(step, half=False),
                             {"step": step, "val_loss": 2.0 / step})
    # A conversion interrupted after the rename that set step 15 aside (still a complete npz checkpoint).
    checkpoint_npz.write(str(root / "step_00000015.npz"), make_state(15, half=False), {"step": 15, "val_loss": None})
    checkpoint_npz.write(str(root / "step_00000020"), make_state(20, half=False), {"step": 20})
    with open(root / "step_00000020" / "state.npz", "r+b") as f:  # damaged: cannot be converted
        f.seek(100)
        f.write(b"\xff" * 8)
    assert checkpoint.latest_meta(str(tmp_path))["step"] == 20

    messages = []
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        state, meta = checkpoints.restore(target_of(make_state(half=False)), warn=messages.append)
    assert_same(state, make_state(15, half=False))  # the newest that converts
    assert meta["step"] == 15 and "sha256" not in meta
    assert sum("converted the checkpoint" in m for m in messages) == 3, messages
    assert any("cannot convert" in m and "step_00000020.npz" in m and "checksum mismatch" in m for m in messages)
    assert steps_on_disk(tmp_path) == [5, 10, 15]
    assert sorted(os.listdir(root)) == ["step_00000005", "step_00000010", "step_00000015",
                                        "step_00000020.npz"]  # the damaged one is left as it was
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:  # the converted ones are orbax's now
        assert_same(checkpoints.restore(target_of(make_state(half=False)))[0], make_state(15, half=False))
        assert sorted(checkpoints.manager.all_steps()) == [5, 10, 15]


def test_an_npz_checkpoint_of_a_step_a_later_run_saved_is_not_converted(tmp_path):
    checkpoint_npz.write(str(tmp_path / "checkpoints" / "step_00000005"), make_state(5, half=False), {"step": 5})
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:  # a new run (init_from=scratch) in the same out_dir
        checkpoints.save(5, make_state(50, half=False), {"step": 5}, 1.0)
    messages = []
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        state, _ = checkpoints.restore(target_of(make_state(half=False)), warn=messages.append)
    assert_same(state, make_state(50, half=False))  # the newer run's, not the old npz
    assert any("not converting" in m and "step_00000005.npz" in m for m in messages), messages
    assert (tmp_path / "checkpoints" / "step_00000005.npz" / "state.npz").exists()  # left as it was


def test_saving_and_restoring_never_pickle(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        checkpoints.save(1, make_state(1), {"run": "test"}, 1.0)
    with checkpoint.Checkpoints(str(tmp_path)) as checkpoints:
        assert_same(checkpoints.restore(target_of(make_state()))[0], make_state(1))
    # Every file is JSON, orbax's commit marker, or tensorstore's OCDBT (its own magic, zstd-compressed chunks).
    kinds = {b"{": "json", b"Checkpoint": "commit marker", b"\x0c\xdb": "ocdbt", b"\x28\xb5\x2f\xfd": "zstd"}
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        head = path.read_bytes()[:16]
        assert any(head.startswith(magic) for magic in kinds), (path, head)
