"""The checkpoint format before orbax: `step_00001000/{state.npz, meta.json}`, read to convert it.

`state.npz` holds the TrainingState's leaves as `arr_0 ... arr_{n-1}` (in `jax.tree.leaves` order,
gathered whole onto process 0), and `meta.json` the run's description with `num_leaves` and a
sha256 of `state.npz`. haiku_gpt no longer writes it during training: `checkpoint.Checkpoints`
converts such a directory into an orbax checkpoint the first time it is loaded. `write` remains
for the benchmark that compares the two formats (`python -m haiku_gpt.benchmarks.bench checkpoint`) and for
the tests of that conversion.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

STATE_FILE = "state.npz"
META_FILE = "meta.json"


class Damaged(Exception):
    """The directory is not a readable checkpoint of this format; the message says why."""


def is_npz_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, META_FILE))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(path: str, template) -> tuple[object, dict]:
    """(state shaped like `template`, meta) of the checkpoint directory `path`; raises Damaged."""
    meta = read_meta(path)
    state_file = os.path.join(path, STATE_FILE)
    if meta is None or not os.path.exists(state_file):
        raise Damaged(f"{META_FILE} or {STATE_FILE} missing or unreadable")
    if _sha256(state_file) != meta.get("sha256"):
        raise Damaged(f"{STATE_FILE} is corrupted (checksum mismatch)")
    expected = jax.tree.leaves(template)
    try:
        with np.load(state_file, allow_pickle=False) as z:
            leaves = [z[f"arr_{i}"] for i in range(meta["num_leaves"])]
    except (OSError, ValueError, KeyError) as e:
        raise Damaged(f"cannot be read ({e})") from None
    if len(leaves) != len(expected) or any(a.shape != b.shape or a.dtype != b.dtype
                                           for a, b in zip(leaves, expected)):
        raise Damaged("its arrays do not match this model's parameter shapes")
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "num_leaves")}
    return jax.tree.unflatten(jax.tree.structure(template), leaves), meta


def write(path: str, state, meta: dict) -> None:
    """Write `state` (full arrays) and `meta` as a checkpoint of this format, synchronously, with fsync."""
    os.makedirs(path)
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
    state_file = os.path.join(path, STATE_FILE)
    with open(state_file, "wb") as f:
        np.savez(f, *leaves)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(dict(meta, num_leaves=len(leaves), sha256=_sha256(state_file)), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
