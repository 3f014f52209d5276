"""The flash-attention kernel's compile matrix: does it compile, and with what resources, on each target?

    python -m haiku_gpt.benchmarks.bench --what=kernels [--targets=h100,tpu-v5e] [--dtypes=...] [--head_dims=...]

Glossary
  case      one (target, dtype, head_dim, seq, dropout, pass) to compile; pass is "fwd"
            (the forward kernel alone) or "bwd" (jax.grad: forward + delta + dK/dV + dQ).
  row       a case's result: compile seconds, and per kernel its registers, spills and
            shared memory (GPU, from ptxas and XLA's launch) or scoped VMEM (TPU, from the
            compiled program); `ok` when it compiled, nothing spilled and every kernel's
            memory fits the target (shared memory per block / scoped VMEM).

Each case compiles batch 1 x 2 heads through `haiku_gpt.aot.targets.compile_for` (which picks
the kernel's tiles for the target's device kind). A case that the
compiler rejects is a row with `ok=False` and the compiler's first line, never an exception.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp

from haiku_gpt.aot import targets
from haiku_gpt.kernels.flash_attention import flash_attention

KERNEL_PREFIX = "flash_attention_"
DTYPES = ("float32", "bfloat16")
HEAD_DIMS = (16, 32, 64, 128, 256)
# Sequence lengths: odd ones exercise padding and clamped tiles; the long ones the streaming.
SEQS = {"cuda": (77, 1000, 65536), "tpu": (77, 1000, 32768, 131072)}
DROPOUTS = (0.0, 0.1)
PASSES = ("fwd", "bwd")
HEADS = 2


@dataclasses.dataclass(frozen=True)
class Case:
    target: str
    dtype: str
    head_dim: int
    seq: int
    dropout: float
    pass_: str  # "fwd" | "bwd"
    kv_heads: int = HEADS  # 1: grouped-query K/V (the two query heads share one K/V head)
    segments: bool = False  # document masking: three segments of the sequence


def attention_program(dtype: str, dropout: float, pass_: str, segments: bool = False):
    """The function a case compiles: the kernel's forward, or its gradient (all three inputs)."""
    def forward(q, k, v):
        ids = (jnp.arange(q.shape[1]) * 3 // q.shape[1])[None].repeat(q.shape[0], 0) if segments else None
        return flash_attention(q, k, v, interpret=False, dropout_rate=dropout, segment_ids=ids,
                               dropout_seed=jnp.uint32(0) if dropout else None)

    if pass_ == "fwd":
        return forward
    loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))


@functools.lru_cache(maxsize=None)
def _gpu_shared_memory_per_block(generation: str) -> int | None:
    for line in targets.gpu_spec_text(generation).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "shared_memory_per_block_optin":
            return int(value)
    return None


def _kernel_summary(kernel: targets.KernelResources, target: targets.Target) -> dict:
    """One kernel's numbers, with the problems that make a row fail."""
    problems = []
    if target.platform == "tpu":
        memory, limit = kernel.vmem_bytes, kernel.vmem_limit_bytes or target.scoped_vmem_bytes
        summary = {"vmem_bytes": memory, "vmem_limit_bytes": limit}
    else:
        memory, limit = kernel.shared_memory_bytes, _gpu_shared_memory_per_block(target.generation)
        spills = (kernel.spill_store_bytes or 0) + (kernel.spill_load_bytes or 0)
        summary = {"registers": kernel.registers, "spill_bytes": spills, "smem_bytes": memory,
                   "warps": (kernel.threads_per_block or 0) // 32 or None, "warnings": list(kernel.warnings)}
        if spills:
            problems.append(f"{kernel.name} spills {spills} bytes")
        if kernel.registers is None:
            problems.append(f"{kernel.name}: no ptxas report")
    if memory is not None and limit is not None and memory > limit:
        problems.append(f"{kernel.name} uses {memory} bytes of {limit}")
    summary["problems"] = problems
    return summary


def compile_case(case: Case) -> dict:
    """Compile one case; the row (never raises for a compiler rejection)."""
    target = targets.parse_target(case.target)
    dtype = jnp.dtype(case.dtype)
    x = jax.ShapeDtypeStruct((1, case.seq, HEADS, case.head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, case.seq, case.kv_heads, case.head_dim), dtype)
    row = dataclasses.asdict(case)
    row["pass"] = row.pop("pass_")
    start = time.perf_counter()
    try:
        one = jax.sharding.SingleDeviceSharding(targets.devices(target)[0])  # a kernel runs per device
        result = targets.compile_for(target, attention_program(case.dtype, case.dropout, case.pass_, case.segments),
                                     x, kv, kv, in_shardings=(one, one, one), kernels=KERNEL_PREFIX)
    except Exception as e:  # noqa: BLE001 (the compiler's rejection is the result)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        row.update(ok=False, seconds=time.perf_counter() - start,
                   error=f"{type(e).__name__}: {lines[0] if lines else ''}"[:300], kernels={})
        return row
    kernels = {k.name[len(KERNEL_PREFIX):]: _kernel_summary(k, target) for k in result.kernels}
    problems = [p for k in kernels.values() for p in k["problems"]]
    expected = 1 if case.pass_ == "fwd" else 4
    if len(kernels) < expected:
        problems.append(f"found {len(kernels)} of {expected} kernels: {sorted(kernels)}")
    row.update(ok=not problems, seconds=time.perf_counter() - start, error="; ".join(problems),
               kernels=kernels)
    return row


def cases(target_names: Iterable[str], dtypes: Iterable[str] = DTYPES, head_dims: Iterable[int] = HEAD_DIMS,
          seqs: Iterable[int] | None = None, dropouts: Iterable[float] = DROPOUTS,
          passes: Iterable[str] = PASSES) -> list[Case]:
    out = []
    for name in target_names:
        target = targets.parse_target(name)
        for seq in (seqs or SEQS[target.platform]):
            for dtype in dtypes:
                for head_dim in head_dims:
                    for dropout in dropouts:
                        out += [Case(target.name, dtype, head_dim, seq, dropout, p) for p in passes]
    return out


def _resources(row: dict) -> tuple[str, str, str]:
    """(registers, spills, on-chip memory) over a row's kernels, as table cells."""
    kernels = row["kernels"].values()
    if not kernels:
        return "", "", ""
    if "vmem_bytes" in next(iter(kernels)):
        vmem = max((k["vmem_bytes"] or 0) for k in kernels)
        limit = max((k["vmem_limit_bytes"] or 0) for k in kernels)
        return "", "", f"VMEM {vmem / 2**20:.2f} of {limit / 2**20:.0f} MiB"
    registers = max((k["registers"] or 0) for k in kernels)
    spills = sum(k["spill_bytes"] for k in kernels)
    smem = max((k["smem_bytes"] or 0) for k in kernels)
    return str(registers), str(spills), f"smem {smem / 1024:.0f} KiB"


def markdown(rows: list[dict]) -> str:
    """The matrix as a Markdown table (maxima over a pass's kernels)."""
    lines = ["| target | dtype | head_dim | seq | dropout | pass | compile s | registers | spills | "
             "on-chip memory | result |", "|" + "---|" * 11]
    for r in rows:
        registers, spills, memory = _resources(r)
        result = "pass" if r["ok"] else f"FAIL: {r['error']}"
        lines.append(f"| {r['target']} | {r['dtype']} | {r['head_dim']} | {r['seq']} | {r['dropout']} | "
                     f"{r['pass']} | {r['seconds']:.1f} | {registers} | {spills} | {memory} | {result} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict]) -> str:
    """One line per (target, dtype, head_dim) over its sequence lengths, dropouts and passes:
    cases passed, the slowest compile, the most registers, all spills, the most on-chip memory."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["dtype"], r["head_dim"]), []).append(r)
    lines = ["| target | dtype | head_dim | seqs | passed | compile s (max) | registers (max) | spills | "
             "on-chip memory (max) |", "|" + "---|" * 9]
    for (target, dtype, head_dim), group in groups.items():
        merged = {"kernels": {f"{i}{name}": k for i, r in enumerate(group) for name, k in r["kernels"].items()}}
        registers, spills, memory = _resources(merged)
        seqs = ", ".join(str(s) for s in sorted({r["seq"] for r in group}))
        passed = sum(r["ok"] for r in group)
        failures = "; ".join(sorted({r["error"] for r in group if not r["ok"]}))
        lines.append(f"| {target} | {dtype} | {head_dim} | {seqs} | {passed}/{len(group)}"
                     f"{' (' + failures + ')' if failures else ''} | {max(r['seconds'] for r in group):.1f} | "
                     f"{registers} | {spills} | {memory} |")
    return "\n".join(lines)


__all__ = ["Case", "attention_program", "cases", "compile_case", "markdown", "summary_markdown"]
