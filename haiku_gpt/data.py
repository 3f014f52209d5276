"""Prepared token streams on disk -> random training windows, reproducibly.

A dataset is `data_dir/NAME/{train.bin,val.bin,meta.json}` written by the
prepare scripts in `data/`. The bins are memory-mapped, so a corpus larger
than RAM is fine. Each batch is drawn from a numpy generator seeded by
`(seed, split, step)`: the sampler has no state to save beyond the step, so a
resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Any, Callable

import numpy as np
from jaxtyping import Int

from haiku_gpt.errors import UserError
from haiku_gpt.tokenizer import Tokenizer, load_tokenizer, meta_dtype, read_meta

SPLITS = ("train", "val")
_STREAM_IDS = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    path: str
    meta: dict
    tokenizer: Tokenizer
    splits: dict  # split name -> np.memmap of token ids (uint16, or uint32 for a vocabulary beyond 65536)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def open_dataset(data_dir: str, name: str, block_size: int) -> Dataset:
    path = os.path.join(data_dir, name)
    meta = read_meta(path)
    splits = {}
    for split in SPLITS:
        file = os.path.join(path, f"{split}.bin")
        if not os.path.exists(file):
            raise UserError(
                f"dataset {name!r} at {path} has meta.json but no {split}.bin, so it was not prepared "
                f"completely: prepare it again with `python data/{name}/prepare.py --force` "
                f"(or data/text/prepare.py --force --name {name} --input ...).")
        dtype = meta_dtype(meta)
        tokens = np.memmap(file, dtype=dtype, mode="r") if os.path.getsize(file) else np.zeros(0, dtype)
        if len(tokens) <= block_size:
            raise UserError(
                f"the {split} split of dataset {name!r} has {len(tokens)} tokens, too few for "
                f"block_size={block_size} (a training window needs block_size + 1 tokens): use a "
                f"smaller --config.block_size or prepare a larger corpus.")
        splits[split] = tokens
    return Dataset(name, path, meta, load_tokenizer(meta), splits)


def batch_rng(seed: int, split: str, step: int) -> np.random.Generator:
    """The draw of one step's batch: the same on every process (each keeps its own rows of it)."""
    # The trailing 0 keeps the draws (and README's numbers) of earlier versions, which had a slot here.
    return np.random.default_rng([seed, _STREAM_IDS[split], step, 0])


def sample_batch(
    tokens: np.ndarray, rng: np.random.Generator, batch_shape: tuple[int, ...], block_size: int,
    rows: slice | None = None,
) -> tuple[Int[np.ndarray, "*batch T"], Int[np.ndarray, "*batch T"]]:
    """Random windows: x = tokens[i : i+T], y = tokens[i+1 : i+1+T] (nanoGPT's get_batch).

    `rows` keeps only those rows of the last batch axis: the offsets of the whole batch are drawn
    (so the draw is the same for every process), the windows of the other rows are never read.
    """
    starts = rng.integers(0, len(tokens) - block_size, size=batch_shape)
    if rows is not None:
        starts = starts[..., rows]
    windows = tokens[starts[..., None] + np.arange(block_size + 1)].astype(np.int32)
    return windows[..., :-1], windows[..., 1:]


def train_batches(tokens: np.ndarray, seed: int, step: int, k: int, batch_shape: tuple[int, int],
                  block_size: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batches for steps step..step+k-1, shaped [k, accum, batch, T]; each step's draw depends only on its index.

    `rows`: only these rows of each batch (a process's share of the global batch, see distributed.py).
    """
    xs, ys = zip(*(sample_batch(tokens, batch_rng(seed, "train", step + i), batch_shape, block_size, rows=rows)
                   for i in range(k)))
    return np.stack(xs), np.stack(ys)


class BatchPrefetcher:
    """The training batches of the coming calls, drawn and put on the device by a background thread.

    The loop asks for the batches of the call that starts at `step`; the thread has drawn them (numpy, from the
    memory-mapped tokens) and started their transfer (`put`) while the device ran the calls before, so the
    loop's own host work per step is a queue read and the step's dispatch. The calls' lengths follow
    `steps_in_call(step)` (steps_per_call, or fewer before an evaluation), so the thread walks the same steps
    as the loop, up to `max_steps`; `depth` calls are kept ready. Batches depend only on (seed, step), so
    prefetching changes no number. A context manager: leaving it stops the thread.
    """

    def __init__(self, make: Callable[[int, int], Any], steps_in_call: Callable[[int], int], start: int,
                 max_steps: int, depth: int = 2):
        self._make, self._steps_in_call, self._max_steps = make, steps_in_call, max_steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self, step: int) -> None:
        while step < self._max_steps and not self._stop.is_set():
            k = self._steps_in_call(step)
            try:
                item = (step, k, self._make(step, k))
            except BaseException as e:  # noqa: BLE001 (handed to the loop, which raises it)
                item = (step, k, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            step += k

    def get(self, step: int, k: int):
        """The batches of the call of `k` steps from `step` (the call the loop is about to dispatch)."""
        got_step, got_k, batches = self._queue.get()
        if isinstance(batches, BaseException):
            raise batches
        assert (got_step, got_k) == (step, k), f"prefetched steps {got_step}+{got_k}, the loop is at {step}+{k}"
        return batches

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
