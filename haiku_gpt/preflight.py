"""Preflight: will this config run here? Shapes, parameters, FLOPs and memory, before any array exists.

`python launch.py --mode=check` prints the table below and exits 0 when all is well;
`--mode=train` runs the cheap part of it automatically before training starts.

  1. An analytic estimate (no JAX work at all): the parameter count from the model shape,
     and memory as parameters + gradients + AdamW's two moments (4 x 4 bytes per
     parameter) plus the activations one micro-batch keeps for the backward pass. A
     config that cannot fit (e.g. `--config.n_layer=96 --config.n_embd=12288`) is
     refused here, in well under a second, without tracing or allocating anything.
  2. Abstract traces (`jax.eval_shape`) of init, the train step, eval and the decode
     step (`sample.generate_tokens` for one new token, which runs the model's KV-cached
     forward), with the jaxtyping annotations of the model's modules and the attention
     kernels checked at run time (`jaxtyping.jaxtyped(typechecker=beartype)`), so a
     shape error is reported with the function and the dimensions it disagreed on.
  3. `--mode=check` only: the train step is lowered and compiled for XLA's own FLOP count
     (`cost_analysis`) and memory plan (`memory_analysis`), which is checked against
     the device's memory as well.

The checks are installed only inside `shape_checks()`, and only for the preflight's
traces: training itself runs the same code without the checking overhead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from haiku_gpt import costs
from haiku_gpt.config import attention_desc
from haiku_gpt.errors import UserError, cudnn_missing
from haiku_gpt.experiment import Experiment
from haiku_gpt.sample import generate_tokens
from haiku_gpt.shape_checks import ShapeCheckError, checked, shape_checks
from haiku_gpt.system import available_memory

# ---------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class Report:
    config_name: str
    model: str
    device: str
    params: int
    params_nanogpt: int
    analytic: dict
    analytic_flops: float
    available: int | None
    available_source: str
    devices: int = 1
    traced: list[str] = dataclasses.field(default_factory=list)
    compiled_flops: float | None = None  # XLA's count for one call (an accumulation loop's body once)
    kernels: list[str] = dataclasses.field(default_factory=list)  # --config.target: the kernels' resources
    accumulation: int = 1
    memory: dict | None = None  # compiled: argument, output, alias, temp, peak
    seconds: float = 0.0

    @property
    def estimate(self) -> int:
        return self.memory["peak"] if self.memory else self.analytic["total"]

    def table(self) -> str:
        rows = [("config", f"{self.config_name}: {self.model}"),
                ("device", self.device),
                ("parameters", f"{self.params_nanogpt / 1e6:.2f}M ({self.params:,} with position embeddings)")]
        flops = f"{_si(self.analytic_flops)}FLOP (6N+12LHDT per token)"
        if self.compiled_flops is not None and self.accumulation > 1:
            flops = (f"{_si(self.compiled_flops * self.accumulation)}FLOP (XLA cost analysis: "
                     f"{_si(self.compiled_flops)}FLOP counting the loop over {self.accumulation} accumulated "
                     f"micro-batches once); analytic {flops}")
        elif self.compiled_flops is not None:
            flops = f"{_si(self.compiled_flops)}FLOP (XLA cost analysis); analytic {flops}"
        rows.append(("FLOPs per step", flops))
        a = self.analytic
        rows.append(("memory, analytic", f"{_bytes(a['total'])} = state {_bytes(a['state'])} "
                                         f"(params, grads, AdamW mu/nu) + activations {_bytes(a['activations'])}"))
        if self.memory:
            m = self.memory
            rows += [("memory: arguments", _bytes(m["argument"])),
                     ("memory: outputs", f"{_bytes(m['output'])} ({_bytes(m['alias'])} aliased to donated arguments)"),
                     ("memory: temporaries", _bytes(m["temp"])),
                     ("memory: peak estimate", _bytes(m["peak"]))]
        if self.available is None:
            rows.append(("memory available", "unknown on this device: not checked"))
        else:
            rows.append(("memory available", f"{_bytes(self.available)} ({self.available_source}); "
                                              f"the step needs {self.estimate / self.available:.1%} of it"))
        rows += [("kernel " + line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in self.kernels]
        rows.append(("shapes checked", ", ".join(self.traced) + " (jaxtyping + beartype)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    def summary_line(self) -> str:
        where = (f"of {_bytes(self.available)} {self.available_source}" if self.available is not None
                 else "(device memory unknown)")
        return (f"preflight: {self.params_nanogpt / 1e6:.2f}M parameters, {_si(self.analytic_flops)}FLOP per step, "
                f"about {_bytes(self.estimate)} {where}; shapes checked: {', '.join(self.traced)} "
                f"({self.seconds:.1f}s)")


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _refuse(report: Report, what: str, config: ml_collections.ConfigDict) -> None:
    a = report.analytic
    need, have = report.estimate, report.available
    tips = []
    state = a["state"]  # per device
    if report.devices > 1 and not config.fsdp:
        state = -(-state // report.devices)
        tips.append(f"--config.fsdp=True (shard the parameters, gradients and AdamW state over the "
                    f"{report.devices} devices instead of replicating them: {_bytes(a['state'])} of state "
                    f"becomes about {_bytes(state)} per device)")
    if state > have:  # no batch size or dtype can help: the model itself is too big
        tips.append(f"a smaller model: the parameters, gradients and AdamW state alone take {_bytes(state)} "
                    f"per device ({report.params / 1e9:.2f}B parameters x 16 bytes), whatever the batch size or "
                    f"dtype; use fewer layers (--config.n_layer, now {config.n_layer}) or a narrower model "
                    f"(--config.n_embd, now {config.n_embd})")
    else:
        if config.batch_size > report.devices:
            tips.append(f"a smaller --config.batch_size (now {config.batch_size}) with a larger "
                        f"--config.gradient_accumulation_steps (now {config.gradient_accumulation_steps}) to "
                        "keep the tokens per step")
        if config.dtype != "bfloat16":
            tips.append("--config.dtype=bfloat16 (smaller activations; parameters stay float32)")
        if config.attention_impl != "pallas" and config.block_size >= 512:
            tips.append("--config.attention_impl=pallas (no [T, T] attention matrices)")
        tips.append(f"fewer layers (--config.n_layer, now {config.n_layer}) or a shorter "
                    f"--config.block_size (now {config.block_size})")
    raise UserError(
        f"preflight: this run would not fit in memory: the train step needs about {_bytes(need)} ({what}) "
        f"but the device has {_bytes(have)} ({report.available_source}). Nothing was allocated. Try "
        + "; or ".join(tips) + ". `python launch.py --mode=check ...` prints the whole estimate.")


# ---------------------------------------------------------------------------
# Traces


def _innermost_project_frame(tb) -> str:
    frames = [f for f in traceback.extract_tb(tb)
              if f"{os.sep}haiku_gpt{os.sep}" in f.filename or f"{os.sep}kernels{os.sep}" in f.filename]
    frames = [f for f in frames if not f.filename.endswith(("preflight.py", "shape_checks.py"))]
    if not frames:
        return "JAX"
    f = frames[-1]
    return f"{os.path.basename(os.path.dirname(f.filename))}/{os.path.basename(f.filename)}:{f.lineno} ({f.name})"


def _trace(stage: str, fn: Callable, *args):
    """jax.eval_shape(fn, *args) with shape checks; a shape problem becomes a UserError naming the function."""
    try:
        with shape_checks():
            return jax.eval_shape(fn, *args)
    except ShapeCheckError as e:
        raise UserError(
            f"preflight: the {stage} does not trace: shape check failed in {e.function}: {e.problem}"
            + (f" Dimensions bound so far: {e.dims}." if e.dims else "")
            + " Nothing was allocated; this is a bug in the model code or a config it does not support.") from None
    except RuntimeError as e:
        raise cudnn_missing(f"preflight: the {stage} does not trace", e) from None
    except (TypeError, ValueError, AssertionError) as e:  # jnp shape errors, chex shape assertions
        where = _innermost_project_frame(e.__traceback__)
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise UserError(f"preflight: the {stage} does not trace: {type(e).__name__} in {where}: {first}. Nothing "
                        "was allocated; this is a bug in the model code or a config it does not support.") from None


def _kernel_line(kernel) -> str:
    """One kernel's resources as the report prints them ("name: ...")."""
    if kernel.platform == "tpu":
        limit = kernel.vmem_limit_bytes
        used = "unknown" if kernel.vmem_bytes is None else _bytes(kernel.vmem_bytes)
        return f"{kernel.name}: VMEM {used}" + (f" of {_bytes(limit)} scoped" if limit else "")
    spills = (kernel.spill_store_bytes or 0) + (kernel.spill_load_bytes or 0)
    smem = kernel.shared_memory_bytes
    text = (f"{kernel.name}: {kernel.registers} registers, {spills} bytes spilled, shared memory "
            f"{'unknown' if smem is None else _bytes(smem)}, {(kernel.threads_per_block or 0) // 32} warps")
    return text + "".join(f"; ptxas: {w}" for w in kernel.warnings)


def _tracing_for(target):
    """Trace as the target's compile will: the attention kernel picks its tiles, and its Hopper family
    compiled kernels instead of its interpreter, when tracing; jit reuses these traces when it lowers the
    step for the target, so they must already be the target's."""
    if target is None:
        return contextlib.nullcontext()
    from haiku_gpt.kernels.flash_attention import compiling_for  # noqa: PLC0415

    return compiling_for(target.device_kind)


def _compile_for_target(report: Report, target, steps, state, tokens, config) -> None:
    """Compile the sharded train step for `target`'s compile-only devices; refuse it if it does not fit."""
    from haiku_gpt.aot import targets  # noqa: PLC0415

    result = targets.compile_for(target, steps.train_steps, state, tokens, tokens, kernels="flash_attention_")
    if result.flops is not None:
        report.compiled_flops = result.flops * target.num_devices  # per device -> the whole step
    m = result.memory
    report.memory = {"argument": m.argument_bytes, "output": m.output_bytes, "alias": m.alias_bytes,
                     "temp": m.temp_bytes, "peak": m.peak_bytes}
    report.kernels = [_kernel_line(k) for k in result.kernels]
    if m.peak_bytes > target.hbm_bytes:
        _refuse(report, f"XLA's memory plan of the step compiled for {target.name}, per device: arguments "
                        f"{_bytes(m.argument_bytes)}, outputs {_bytes(m.output_bytes)}, temporaries "
                        f"{_bytes(m.temp_bytes)}", config)


def check_shapes(exp: Experiment) -> Report:
    """Before training: the analytic estimate and the abstract traces, nothing compiled; raises UserError
    when the run cannot work here. Logs one line."""
    report = _preflight(exp, compile=False)
    exp.log(report.summary_line())
    return report


def check_compiled(exp: Experiment) -> Report:
    """--mode=check: the analytic estimate, the traces, and the train step compiled for this machine (or
    for --config.target's devices) for XLA's FLOPs and memory plan; logs the whole report as a table."""
    report = _preflight(exp, compile=True)
    exp.log(f"preflight check ({report.seconds:.1f}s):")
    exp.log(report.table())
    exp.log("ok: this config fits and every traced shape agrees with its annotations.")
    return report


def target_mesh(config) -> Any:
    """--config.target's compile-only devices as a mesh for `setup(config, mesh=...)` (None without a target):
    the one place outside the aot tools that resolves a target. A bad name is a UserError listing the targets."""
    if not config.target:
        return None
    from haiku_gpt.aot import targets  # noqa: PLC0415 (the aot extra is optional)

    return targets.make_mesh(targets.parse_target(config.target))


def _where(exp: Experiment):
    """(target or None, bytes available per device or None, where that figure comes from, devices, description)."""
    config = exp.config
    if not config.target:
        device = jax.devices()[0]
        available, source = available_memory(device)
        return None, available, source, jax.device_count(), f"{device.platform} ({device.device_kind})"
    from haiku_gpt.aot import targets  # noqa: PLC0415 (the aot extra is optional)

    target = targets.parse_target(config.target)
    description = (f"{target.name}: {target.num_devices} x {target.device_kind}, compile-only (params and AdamW "
                   f"state {'sharded, fsdp' if config.fsdp else 'replicated'}; batch split over the devices)")
    return target, target.hbm_bytes, f"{target.device_kind} HBM per device", target.num_devices, description


def _preflight(exp: Experiment, compile: bool) -> Report:
    t0 = time.perf_counter()
    config, mcfg = exp.config, exp.model_config
    target, available, source, devices, device_desc = _where(exp)
    analytic = costs.analytic_memory(config, mcfg, devices)
    heads = f"{mcfg.n_head} heads" + (f" ({mcfg.kv_heads} key/value)" if mcfg.kv_heads != mcfg.n_head else "")
    model_desc = (f"{mcfg.n_layer} layers, {heads}, {mcfg.n_embd} wide, block {mcfg.block_size}, "
                  f"vocab {mcfg.vocab_size}, batch {config.batch_size} x {config.gradient_accumulation_steps}, "
                  f"{config.dtype}, attention {attention_desc(config)}"
                  + (", document mask" if config.document_mask else ""))
    report = Report(
        config_name=config.config_name, model=model_desc, device=device_desc, devices=devices,
        params=analytic["params"], params_nanogpt=costs.param_count(mcfg), analytic=analytic,
        analytic_flops=costs.flops_per_step(config, mcfg), available=available, available_source=source,
        accumulation=config.gradient_accumulation_steps)
    if available is not None and analytic["total"] > available:
        _refuse(report, "analytic estimate: " + _bytes(analytic["state"]) + " of state + "
                + _bytes(analytic["activations"]) + " of activations", config)
    # The attention cross-check (chex value assertions) needs concrete values, so the traces and the
    # compile leave it out (`Steps.traceable`): it changes no shape.
    steps = exp.steps.traceable()
    with _tracing_for(target):
        state, tokens = _trace_all(exp, steps, report)
    if compile and target is not None:
        _compile_for_target(report, target, steps, state, tokens, config)
    elif compile:
        _compile_here(report, steps, state, tokens, config)
    report.seconds = time.perf_counter() - t0
    return report


def _trace_all(exp: Experiment, steps, report: Report):
    """Abstract traces (shapes only, nothing allocated) of `steps`' init, train step and eval, and of one
    decode step. Returns (the abstract state, the abstract tokens)."""
    config = exp.config
    state = _trace("init", functools.partial(steps.init, config.seed))
    report.params = sum(x.size for x in jax.tree.leaves(state.params))  # counted on the traced init
    report.traced.append("init")
    tokens = jax.ShapeDtypeStruct((1, config.gradient_accumulation_steps, config.batch_size, config.block_size),
                                  jnp.int32)
    _trace("train step", steps.train_steps, state, tokens, tokens)
    report.traced.append("train step")
    eval_tokens = jax.ShapeDtypeStruct((config.eval_iters, config.batch_size, config.block_size), jnp.int32)
    _trace("eval step", steps.eval_losses, state.params, eval_tokens, eval_tokens)
    report.traced.append("eval")
    generate = checked("haiku_gpt.sample.generate_tokens", inspect.unwrap(generate_tokens))
    decode = functools.partial(generate, config=steps.model_config, max_new_tokens=1, valid_vocab=exp.valid_vocab)
    prompt = jax.ShapeDtypeStruct((1, min(2, config.block_size)), jnp.int32)
    _trace("decode step", decode, state.params, prompt, jax.ShapeDtypeStruct((2,), jnp.uint32))
    report.traced.append("decode")
    return state, tokens


def _compile_here(report: Report, steps, state, tokens, config) -> None:
    """Compile the train step for this machine: XLA's FLOPs and memory plan; refuse it if it does not fit."""
    compiled = steps.train_steps.lower(state, tokens, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops", -1) >= 0:
        report.compiled_flops = float(cost["flops"])
    mem = compiled.memory_analysis()
    if mem is None:
        return
    m = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
         "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes}
    # Everything live at once: the arguments, the outputs not written over donated
    # arguments, and the temporaries (XLA's own peak figure, where it has one, if larger).
    planned = m["argument"] + m["output"] - m["alias"] + m["temp"]
    m["peak"] = max(planned, getattr(mem, "peak_memory_in_bytes", 0) or 0)
    report.memory = m
    if report.available is not None and m["peak"] > report.available:
        _refuse(report, f"XLA's memory plan of the compiled step: arguments {_bytes(m['argument'])}, "
                        f"outputs {_bytes(m['output'])}, temporaries {_bytes(m['temp'])}", config)
