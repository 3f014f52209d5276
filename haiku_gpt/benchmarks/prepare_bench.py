"""Peak memory and throughput of the streaming prepare on a corpus it generates (README's numbers).

    python -m haiku_gpt.benchmarks.prepare_bench --dir /tmp/prepare_bench --sizes_mb 250 1000 \\
        [--format jsonl|parquet|txt] [--workers N] [--shakespeare PATH/to/input.txt]

Generates --format shards of SHARD_MB MB of pseudo-English under --dir (tiny Shakespeare's
lines, shuffled into documents of 5 to 60 lines; a .txt shard is one document), then
prepares the first 250 MB and all 1000 MB of them with GPT-2's BPE, each in a fresh
process, and prints for each size: the input MB, seconds, MB/s, tokens/s, the CPU
seconds of all processes, and the memory: the peak RSS of the main process and its RSS by
quarter of the run, the peak RSS of the largest worker, and the peak PSS of all of them
together (from /proc: Linux only). Memory is flat when none of these grows with the size.
The prepared token files are deleted after each run; the shards stay in --dir for the next
run (delete --dir when done).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from haiku_gpt import prepare

SHARD_MB = 50
SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare_char" / "input.txt"


def shakespeare_lines(path: Path) -> list[str]:
    """tiny Shakespeare's non-empty lines (downloaded into data/shakespeare_char/ if missing)."""
    if not path.is_file():
        prepare.download(prepare.TINY_SHAKESPEARE_URL, path)
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shard_documents(lines: list[str], rng: np.random.Generator, target_bytes: int) -> list[str]:
    """Documents of 5 to 60 random lines until about `target_bytes` of text."""
    docs, size = [], 0
    while size < target_bytes:
        picks = rng.integers(0, len(lines), size=rng.integers(5, 61))
        doc = "\n".join(lines[i] for i in picks) + "\n"
        docs.append(doc)
        size += len(doc) + 12  # about what json adds per line
    return docs


def write_shard(path: Path, docs: list[str]) -> None:
    """One shard, written aside and renamed, so an interrupted generation is regenerated."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp, row_group_size=1000)
    else:
        tmp.write_text("".join(docs), encoding="utf-8")
    os.replace(tmp, path)


def generate(root: Path, fmt: str, total_mb: int, shakespeare: Path) -> list[Path]:
    """The shards of `total_mb` MB (those already in `root` are reused)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = None
    shards = []
    for i in range(-(-total_mb // SHARD_MB)):
        path = root / f"shard_{i:04d}.{fmt}"
        if not path.exists():
            lines = lines or shakespeare_lines(shakespeare)
            print(f"generating {path}", flush=True)
            write_shard(path, shard_documents(lines, np.random.default_rng(i), SHARD_MB << 20))
        shards.append(path)
    return shards


def corpus_of(root: Path, shards: list[Path], size_mb: int) -> Path:
    """A folder of hard links to the first shards, `size_mb` MB in all."""
    folder = root / f"corpus_{size_mb}mb"
    folder.mkdir(exist_ok=True)
    for shard in shards[: -(-size_mb // SHARD_MB)]:
        if not (folder / shard.name).exists():
            os.link(shard, folder / shard.name)
    return folder


def _memory_mb(pid: int | str, key: str, file: str = "status") -> float:
    """A line of /proc/PID/status (VmRSS: resident now, VmHWM: its peak) or smaps_rollup (Pss: resident,
    shared pages divided among their sharers) in MB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """The processes under `pid` (Linux: /proc/PID/task/*/children)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _cmdline(pid: int | str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class MemorySampler(threading.Thread):
    """This process tree's memory, sampled every 0.1 s: the peak of its total PSS (what the tree
    costs the machine, shared pages counted once), the peak RSS of its largest worker, and this
    process's RSS over time.

    getrusage's ru_maxrss can't give these: it is per process, and Linux carries it across exec,
    so a spawned worker would report at least its parent's size when it was spawned. A child
    still between fork and exec (a copy of this process, same command line) is no worker yet.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.total_mb = self.worker_mb = 0.0
        self.main_mb: list[float] = []

    def run(self) -> None:
        me = _cmdline("self")
        while not self.stop.wait(0.1):
            children = _descendants(os.getpid())
            workers = [_memory_mb(pid, "VmRSS") for pid in children if _cmdline(pid) != me]
            self.worker_mb = max([self.worker_mb, *workers])
            pss = [_memory_mb(pid, "Pss", "smaps_rollup") for pid in ["self", *children]]
            self.total_mb = max(self.total_mb, sum(pss))
            self.main_mb.append(_memory_mb("self", "VmRSS"))


def measure(corpus: Path, out_dir: Path, workers: int) -> dict:
    """Prepare `corpus` in this process; its numbers (run in a fresh process by `main`). Linux only."""
    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    meta = prepare.prepare_corpus(corpus, out_dir, "gpt2", force=True, workers=workers)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    nbytes = sum(p.stat().st_size for p in corpus.iterdir())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    main, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = main.ru_utime + main.ru_stime + children.ru_utime + children.ru_stime
    return {
        "input_mb": round(nbytes / 1e6, 1), "workers": workers, "seconds": round(seconds, 1),
        "mb_per_s": round(nbytes / 1e6 / seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
        # CPU time of all processes: what the work costs whatever else runs on the machine.
        "cpu_seconds": round(cpu, 1), "mb_per_cpu_s": round(nbytes / 1e6 / cpu, 1),
        "main_peak_rss_mb": round(_memory_mb("self", "VmHWM")),  # exact: the kernel's high-water mark
        # this process's RSS after a quarter, half, three quarters and all of the run: flat or growing
        "main_rss_mb_by_quarter": [round(sampler.main_mb[len(sampler.main_mb) * q // 4 - 1]) for q in (1, 2, 3, 4)],
        "worker_peak_rss_mb": round(sampler.worker_mb),  # the largest worker's, sampled
        "total_peak_pss_mb": round(sampler.total_mb),  # main + all workers at the same instant, sampled
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/prepare_bench"), help="where the shards go")
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[250, 1000])
    parser.add_argument("--format", choices=("jsonl", "parquet", "txt"), default="jsonl")
    parser.add_argument("--workers", type=int, default=prepare.default_workers())
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help="tiny Shakespeare's input.txt")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one run, in this process
    args = parser.parse_args(argv)
    out_dir = args.dir / "prepared"
    if args.measure:
        print(json.dumps(measure(args.measure, out_dir, args.workers)))
        return 0
    shards = generate(args.dir / args.format, args.format, max(args.sizes_mb), args.shakespeare)
    for size in sorted(args.sizes_mb):
        corpus = corpus_of(args.dir / args.format, shards, size)
        command = [sys.executable, "-m", "haiku_gpt.benchmarks.prepare_bench", "--dir", str(args.dir),
                   "--workers", str(args.workers), "--measure", str(corpus)]
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        if run.returncode:
            print(run.stdout + run.stderr, file=sys.stderr)
            return run.returncode
        print(f"{args.format} {run.stdout.strip().splitlines()[-1]}", flush=True)
        for name in ("train.bin", "val.bin"):
            (out_dir / name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
