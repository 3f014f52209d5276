"""Crash-safe checkpoints: one directory per step, written aside and renamed into place.

Layout: `out_dir/checkpoints/step_00001000/{state.npz, meta.json}`. A checkpoint
is written to a hidden temporary directory, fsynced, then renamed: a crash at
any moment (even `kill -9` mid-write) leaves at most a stray temporary
directory (ignored, and removed by the next save), never a half-written
checkpoint under a real name. `meta.json`
holds a sha256 of `state.npz`, so a file damaged later is detected and the
loader falls back to the previous checkpoint. The newest `keep` checkpoints are
kept, plus the one with the best validation loss.

Why not orbax: this format is two plain files anyone can open with numpy and
json, restores bit for bit, and needs no extra dependency; the training state
of a model this size is gathered on one host anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from haiku_gpt.config import MODEL_FIELDS
from haiku_gpt.errors import UserError
from haiku_gpt.system import fsync_dir

_PREFIX = "step_"
_NAME = re.compile(r"step_\d{8,}")  # step_00001000; not .tmp-step_* or step_*.old-PID leftovers
_LEFTOVER = re.compile(r"(?:\.tmp-step_\d+|step_\d+\.old)-(\d+)")  # from a writer that died mid-save


def ensure_writable(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        writable = os.access(out_dir, os.W_OK)
    except OSError as e:
        writable, why = False, f" ({e.strerror})"
    else:
        why = ""
    if not writable:
        raise UserError(f"--config.out_dir={out_dir} is not writable{why}: choose a directory you can write to.")


def _checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint directories, oldest first (temporary directories are ignored)."""
    root = _checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if _NAME.fullmatch(n)), key=lambda n: int(n[len(_PREFIX):]))
    return [os.path.join(root, n) for n in names]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    return True


def _remove_leftovers(root: str) -> None:
    """Temporary directories of writers that died mid-save (kill -9, power loss): never a checkpoint."""
    for name in os.listdir(root):
        m = _LEFTOVER.fullmatch(name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save(out_dir: str, step: int, state, meta: dict, keep: int) -> str:
    """Write `state` (any pytree of arrays) and `meta` (JSON-able) as the checkpoint of `step`."""
    root = _checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    _remove_leftovers(root)
    final = os.path.join(root, f"{_PREFIX}{step:08d}")
    tmp = os.path.join(root, f".tmp-{_PREFIX}{step:08d}-{os.getpid()}")
    os.makedirs(tmp)
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]
    state_file = os.path.join(tmp, "state.npz")
    with open(state_file, "wb") as f:
        np.savez(f, *leaves)
        f.flush()
        os.fsync(f.fileno())
    meta = dict(meta, step=step, num_leaves=len(leaves), sha256=_sha256(state_file))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):  # re-saving a step (e.g. after resume): move the old one aside first
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    _prune(out_dir, keep)
    return final


def _read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _prune(out_dir: str, keep: int) -> None:
    paths = list_checkpoints(out_dir)
    metas = {p: _read_meta(p) for p in paths}
    scored = [(m["val_loss"], p) for p, m in metas.items() if m and m.get("val_loss") is not None]
    best = min(scored)[1] if scored else None
    for path in paths[:-keep]:
        if path != best:
            shutil.rmtree(path, ignore_errors=True)


def load_latest(out_dir: str, template, warn=print):
    """(state, meta) of the newest intact checkpoint; damaged ones are reported and skipped.

    `template` is a pytree with the expected structure (e.g. from `jax.eval_shape`);
    the loaded leaves must match its shapes and dtypes.
    """
    paths = list_checkpoints(out_dir)
    if not paths:
        raise UserError(
            f"no checkpoint found in {_checkpoint_root(out_dir)}: train first (`python launch.py "
            f"--config=...`), or point --config.out_dir at the directory of an earlier run.")
    expected = jax.tree.leaves(template)
    treedef = jax.tree.structure(template)
    problems = []
    for path in reversed(paths):
        meta = _read_meta(path)
        state_file = os.path.join(path, "state.npz")
        if meta is None or not os.path.exists(state_file):
            problems.append(f"{path}: meta.json or state.npz missing or unreadable")
        elif _sha256(state_file) != meta.get("sha256"):
            problems.append(f"{path}: state.npz is corrupted (checksum mismatch)")
        else:
            try:
                with np.load(state_file) as z:
                    leaves = [z[f"arr_{i}"] for i in range(meta["num_leaves"])]
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{path}: cannot be read ({e})")
                continue
            if len(leaves) == len(expected) and all(
                    a.shape == b.shape and a.dtype == b.dtype for a, b in zip(leaves, expected)):
                for p in problems:
                    warn(f"warning: skipped damaged checkpoint {p}")
                return jax.tree.unflatten(treedef, leaves), meta
            problems.append(f"{path}: its arrays do not match this model's parameter shapes")
    raise UserError("no usable checkpoint in " + _checkpoint_root(out_dir) + ": " + "; ".join(problems)
                    + ". Start a new run with --config.init_from=scratch (and a fresh --config.out_dir).")


def latest_meta(out_dir: str) -> dict | None:
    """meta.json of the newest checkpoint (for config checks before anything is built)."""
    for path in reversed(list_checkpoints(out_dir)):
        meta = _read_meta(path)
        if meta is not None:
            return meta
    return None


# ---------------------------------------------------------------------------------------------
# What a checkpoint records about its run, and restoring it into a run


def run_meta(config: ml_collections.ConfigDict, dataset, vocab_size: int, **extra) -> dict:
    """meta.json's description of the run: model shape, dataset and vocabulary, the whole config."""
    model_fields = {f: config[f] for f in MODEL_FIELDS if f != "vocab_size"}
    model_fields["vocab_size"] = vocab_size
    vocab = {k: dataset.meta.get(k) for k in ("tokenizer", "vocab_size", "itos")}
    return dict(model=model_fields, dataset=dataset.name, vocab=vocab,
                config=json.loads(config.to_json_best_effort()), **extra)


def check_compatible(meta: dict, expected: dict, out_dir: str) -> None:
    """A checkpoint (`meta`) must match the model shape and the vocabulary of this run (`expected`: run_meta)."""
    # The vocabulary first: another dataset also changes vocab_size, and the dataset is the real cause.
    if meta.get("vocab") != expected["vocab"]:
        raise UserError(
            f"the checkpoint in {out_dir} was trained on dataset {meta.get('dataset')!r} with another "
            f"vocabulary than dataset {expected['dataset']!r} has now: use --config.dataset={meta.get('dataset')} "
            "(prepared with the same tokenizer and text), or start a new run in another --config.out_dir.")
    diffs = [f"{k}: checkpoint {meta['model'].get(k)!r} vs config {v!r}"
             for k, v in expected["model"].items() if meta["model"].get(k) != v]
    if diffs:
        raise UserError(
            f"the checkpoint in {out_dir} has a different model shape ({'; '.join(diffs)}): "
            "pass the checkpoint's values (--config.<field>=...) to resume or sample from it, or "
            "start a new run in another --config.out_dir.")


def restore(out_dir: str, template, expected: dict, warn=print):
    """(state, meta) of out_dir's newest intact checkpoint, checked against this run (`expected`: run_meta)."""
    meta = latest_meta(out_dir)
    if meta is not None:
        check_compatible(meta, expected, out_dir)
    state, meta = load_latest(out_dir, template, warn=warn)
    return jax.tree.map(jnp.asarray, state), meta
