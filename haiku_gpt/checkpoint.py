"""Checkpoints with orbax-checkpoint: saved asynchronously, one set of shards per process, verified on load.

Layout: `out_dir/checkpoints/step_00001000/`
    state/          the TrainingState (params, optimizer state, step, rng): orbax's StandardSave, an OCDBT
                    store in which every process writes the shards its devices hold (no gather)
    meta/metadata   JSON: the run (`run_meta`: model shape, vocabulary, config), best and current val
                    loss, and a fingerprint of every array of the state
    _CHECKPOINT_METADATA, commit_success.txt   orbax's (with val_loss, which retention reads)

`Checkpoints` is an orbax `CheckpointManager`:
- `save` returns once the arrays are copied off the devices; the files are written by a background
  thread while training goes on (the next save, or `close`, waits for the write to finish).
- A save is written to `step_N.orbax-checkpoint-tmp-*` and renamed when complete (orbax's atomic
  finalize): a crash at any moment, even `kill -9` mid-write, leaves at most such a temporary
  directory, which the next run removes, never a half-written checkpoint under a real name.
- Retention: the newest `keep` checkpoints, plus the one with the best val loss (orbax's LatestN
  and BestN preservation policies; each save's val loss is on disk, so this holds across runs).
- Restoring reads each process's shards straight into the layout this run asks for (`target`'s
  shardings), so a checkpoint moves between device counts and between fsdp and replication.

Damage: orbax reads a flipped byte in a data file back without complaint, so the meta records a
fingerprint of each array (`fingerprint`: the sum of its bits modulo 2**32, taken before the save).
Restore recomputes it: a checkpoint that does not read back, or reads back different, is reported
and the previous one is used.

Checkpoints written before orbax (`state.npz` + `meta.json`, checkpoint_npz.py) are converted the
first time a run loads them: each is renamed to `step_N.npz` (out of orbax's sight), saved anew as an
orbax checkpoint, and removed once that save is complete, so a crash during the conversion loses
nothing. No format here uses pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from haiku_gpt import checkpoint_npz, distributed
from haiku_gpt.config import MODEL_FIELDS, kv_heads
from haiku_gpt.errors import UserError
from haiku_gpt.system import fsync_dir
from haiku_gpt.tokenizer import one_line

Damaged = checkpoint_npz.Damaged  # a checkpoint that cannot be used; the message says why

_PREFIX = "step"
_DIGITS = 8
_NAME = re.compile(r"step_(\d{8,})")  # step_00001000; not step_*.orbax-checkpoint-tmp-* or step_*.npz
_CONVERTING = re.compile(r"step_(\d{8,})\.npz")  # an old-format checkpoint being converted
_META_ITEM, _STATE_ITEM = "meta", "state"


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
    return os.path.join(os.path.abspath(out_dir), "checkpoints")


def _step_dirs(root: str, pattern: re.Pattern) -> dict[int, str]:
    if not os.path.isdir(root):
        return {}
    found = (pattern.fullmatch(n) for n in os.listdir(root))
    return {int(m.group(1)): os.path.join(root, m.group(0)) for m in found if m}


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint directories, oldest first (orbax's temporary directories are ignored)."""
    dirs = _step_dirs(_checkpoint_root(out_dir), _NAME)
    return [dirs[s] for s in sorted(dirs)]


def read_meta(path: str) -> dict | None:
    """The meta of the checkpoint directory `path` (either format), or None where it is unreadable."""
    if checkpoint_npz.is_npz_checkpoint(path):
        return checkpoint_npz.read_meta(path)
    try:
        with open(os.path.join(path, _META_ITEM, "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def latest_meta(out_dir: str) -> dict | None:
    """The meta of the newest checkpoint, either format (for config checks before anything is built)."""
    root = _checkpoint_root(out_dir)
    dirs = {**_step_dirs(root, _CONVERTING), **_step_dirs(root, _NAME)}
    for step in sorted(dirs, reverse=True):
        meta = read_meta(dirs[step])
        if meta is not None:
            return meta
    return None


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}  # bool, bfloat16, float32/int32/uint32 (x64 is off)


def _bits(x):
    """x's elements as unsigned integers of the same width (a view: no copy)."""
    unsigned = _UNSIGNED[x.dtype.itemsize]
    return x.astype(unsigned) if x.dtype == np.bool_ else x.view(unsigned)


@jax.jit
def _device_sums(leaves) -> jax.Array:
    return jnp.stack([jnp.sum(_bits(x), dtype=jnp.uint32) for x in leaves])


def fingerprint(state) -> list[int]:
    """Per array of `state`: the sum of its elements' bits, read as unsigned integers, modulo 2**32.

    Any single changed element changes it (the difference of two distinct values of at most 32 bits is
    not a multiple of 2**32), and integer sums do not depend on how an array is sharded. On a CPU the
    arrays already lie in host memory, and numpy sums them in place (XLA:CPU's integer reductions are
    ten times slower); on a GPU or TPU it is one jitted pass over device memory."""
    leaves = jax.tree.leaves(state)
    if any(not isinstance(x, jax.Array) or next(iter(x.devices())).platform != "cpu" for x in leaves):
        return [int(v) for v in np.asarray(_device_sums(leaves))]
    sums = np.zeros(len(leaves), np.uint32)  # numpy's unsigned sums wrap modulo 2**32
    for i, x in enumerate(leaves):
        for shard in x.addressable_shards:
            if shard.replica_id == 0:  # each element once, on the one device that holds replica 0
                sums[i] += np.add.reduce(_bits(np.asarray(shard.data)).ravel(), dtype=np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0, dtype=np.uint32)
    return [int(v) for v in sums]


def _no_metric_is_fine(record: logging.LogRecord) -> bool:
    """A save on a signal has no val loss, by design: orbax's warning about it is dropped."""
    return not record.getMessage().startswith("Requested `tracked_metric`")



class Checkpoints:
    """out_dir's checkpoints, through an orbax CheckpointManager (see the module docstring).

    Every process opens it and takes part in each save and restore; orbax writes `meta` once.
    `keep`: the newest checkpoints a save keeps (besides the best); None keeps every one.
    """

    def __init__(self, out_dir: str, keep: int | None = None):
        import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy: imported where checkpoints are used)
        from orbax.checkpoint import checkpoint_managers as policies  # noqa: PLC0415

        absl_log = logging.getLogger("absl")
        absl_log.setLevel(logging.WARNING)  # orbax logs every step of a save at INFO
        if _no_metric_is_fine not in absl_log.filters:
            absl_log.addFilter(_no_metric_is_fine)
        # A damaged file fails orbax's reads in asyncio tasks, each logged with a traceback when collected;
        # restore reports each damaged checkpoint in one line instead.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        _quiet_abandoned_reads()
        self.out_dir, self.root, self._ocp = out_dir, _checkpoint_root(out_dir), ocp
        if distributed.is_main_process():
            _set_aside_npz_checkpoints(self.root)
        distributed.barrier("npz checkpoints set aside")
        keep_best = policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                   keep_checkpoints_without_metrics=False)  # reverse: keep the lowest
        options = ocp.CheckpointManagerOptions(
            step_prefix=_PREFIX, step_format_fixed_length=_DIGITS, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            # best_fn only makes orbax write each save's val_loss to disk (_CHECKPOINT_METADATA), so that a
            # later run's manager still knows the best; which checkpoints stay is the preservation policy's.
            best_fn=lambda m: m["val_loss"], best_mode="min",
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(n=keep), keep_best]))
        self.manager = ocp.CheckpointManager(self.root, item_names=(_STATE_ITEM, _META_ITEM), options=options)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the write in flight, then release the manager."""
        self.manager.close()

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"{_PREFIX}_{step:0{_DIGITS}d}")

    def save(self, step: int, state, meta: dict, val_loss: float | None = None) -> str:
        """Start saving `state` (laid out on the devices) as the checkpoint of `step`; returns its path.

        Blocks until the previous save is written and this one's arrays are copied off the devices.
        Orbax writes a step once: an existing checkpoint of `step` (one a restore skipped as damaged, or
        another run's in a reused out_dir) is deleted first. train.py never saves again the step it
        resumed from, whose checkpoint already holds this state."""
        ocp = self._ocp
        meta = dict(meta, step=step, val_loss=val_loss, fingerprint=fingerprint(state))
        self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            self.manager.delete(step)
        self.manager.save(step, force=True, metrics=None if val_loss is None else {"val_loss": val_loss},
                          args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardSave(state),
                                                     _META_ITEM: ocp.args.JsonSave(meta)}))
        return self.path(step)

    def restore(self, target, warn=print):
        """(state, meta) of the newest intact checkpoint, laid out as `target` (ShapeDtypeStructs with
        shardings) asks; damaged ones are reported and skipped."""
        self._convert_npz_checkpoints(target, warn)
        steps = sorted(self.manager.all_steps())
        if not steps:
            raise _no_checkpoint(self.root)
        problems = []
        for step in reversed(steps):
            try:
                state, meta = self.read(step, target)
            except Damaged as e:
                problems.append(f"{self.path(step)}: {e}")
                continue
            for p in problems:
                warn(f"warning: skipped damaged checkpoint {p}")
            return state, meta
        raise UserError(f"no usable checkpoint in {self.root}: " + "; ".join(problems)
                        + ". Start a new run with --config.init_from=scratch (and a fresh --config.out_dir).")

    def read(self, step: int, target):
        """(state, meta) of the checkpoint of `step`, laid out as `target`; raises Damaged."""
        ocp = self._ocp
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                _STATE_ITEM: ocp.args.StandardRestore(target), _META_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many types for unreadable files)
            while e.__cause__ is not None or e.__context__ is not None:  # the first failure says what is wrong
                e = e.__cause__ or e.__context__
            raise Damaged(f"cannot be read ({one_line(e, 240)})") from None
        state, meta = restored[_STATE_ITEM], restored[_META_ITEM]
        if not isinstance(meta, dict) or fingerprint(state) != meta.get("fingerprint"):
            raise Damaged("its arrays differ from the fingerprint saved with them (corrupted)")
        return state, meta

    def _convert_npz_checkpoints(self, target, warn) -> None:
        """Save each checkpoint of the format before orbax anew as an orbax checkpoint (see the docstring)."""
        for step, path in sorted(_step_dirs(self.root, _CONVERTING).items()):
            if step in self.manager.all_steps():  # a later run (init_from=scratch here) saved this step anew
                warn(f"warning: not converting the checkpoint {path} (saved before orbax): {self.path(step)} "
                     "holds a newer run's checkpoint of that step; it is left as it is")
                continue
            try:
                state, meta = checkpoint_npz.read(path, target)
            except Damaged as e:
                warn(f"warning: cannot convert the checkpoint {path} (saved before orbax): {e}; it is left as it is")
                continue
            state = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), state, target)
            self.save(step, state, meta, meta.get("val_loss"))
            self.manager.wait_until_finished()
            distributed.barrier("npz checkpoint converted")
            if distributed.is_main_process():
                shutil.rmtree(path)
            warn(f"converted the checkpoint {path} (saved before orbax) into {self.path(step)}")


def _no_checkpoint(root: str) -> UserError:
    return UserError(f"no checkpoint found in {root}: train first (`python launch.py --config=...`), or point "
                     "--config.out_dir at the directory of an earlier run.")


def _quiet_abandoned_reads() -> None:
    """Once a read of a damaged checkpoint fails, orbax abandons the array reads still in flight and
    closes their event loop; Python reports each such coroutine, and each tensorstore callback that
    then finds the loop closed, with a traceback, whenever it happens (even at exit). Restore reports
    the damage in one line instead, so those reports (and only those) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_orbax_reads", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        abandoned = (getattr(unraisable.object, "__qualname__", None) == "_read_array_index_and_device_put"
                     or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"))  # their callbacks
        if not abandoned:
            previous(unraisable)

    hook.drops_abandoned_orbax_reads = True
    sys.unraisablehook = hook


def _set_aside_npz_checkpoints(root: str) -> None:
    """Rename old-format step_N directories to step_N.npz, where orbax does not look (one rename each)."""
    renamed = False
    for step, path in _step_dirs(root, _NAME).items():
        if checkpoint_npz.is_npz_checkpoint(path):
            os.rename(path, path + ".npz")
            renamed = True
    if renamed:
        fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# What a checkpoint records about its run, and restoring it into a run


def run_meta(config: ml_collections.ConfigDict, dataset, vocab_size: int, **extra) -> dict:
    """meta.json's description of the run: model shape, dataset and vocabulary, the whole config."""
    model_fields = {f: config[f] for f in MODEL_FIELDS if f != "vocab_size"}
    model_fields["n_kv_head"] = kv_heads(config)  # resolved: n_kv_head=0 and n_kv_head=n_head are one model
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
    recorded = dict(meta["model"])
    recorded.setdefault("n_kv_head", recorded.get("n_head"))  # checkpoints from before n_kv_head: one per head
    diffs = [f"{k}: checkpoint {recorded.get(k)!r} vs config {v!r}"
             for k, v in expected["model"].items() if recorded.get(k) != v]
    if diffs:
        raise UserError(
            f"the checkpoint in {out_dir} has a different model shape ({'; '.join(diffs)}): "
            "pass the checkpoint's values (--config.<field>=...) to resume or sample from it, or "
            "start a new run in another --config.out_dir.")


def restore(out_dir: str, target, expected: dict, warn=print):
    """(state, meta) of out_dir's newest intact checkpoint, checked against this run (`expected`: run_meta),
    its arrays laid out as `target` (ShapeDtypeStructs with shardings) asks."""
    root = _checkpoint_root(out_dir)
    if not (_step_dirs(root, _NAME) or _step_dirs(root, _CONVERTING)):
        raise _no_checkpoint(root)
    meta = latest_meta(out_dir)
    if meta is not None:
        check_compatible(meta, expected, out_dir)
    with Checkpoints(out_dir) as checkpoints:
        return checkpoints.restore(target, warn)
