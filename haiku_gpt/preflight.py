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
import re
import sys
import time
import traceback
from typing import Callable, Iterator

import beartype
import haiku as hk
import jax
import jax.numpy as jnp
import jaxtyping
import ml_collections

from haiku_gpt.errors import UserError

# Kernel functions checked during the preflight: (module name, attribute). Both the package's
# re-exports (what model.py calls, `kernels.attention(...)`) and the defining modules' globals
# (what the dispatcher calls) are patched.
_KERNEL_FUNCTIONS = (
    ("kernels", "attention"),
    ("kernels", "reference_attention"),
    ("kernels", "cached_attention"),
    ("kernels", "flash_attention"),
    ("kernels.attention", "reference_attention"),
    ("kernels.flash_attention", "flash_attention"),
    ("kernels.reference", "dropout_keep_mask"),
)
_CHECKED_MODULE_PREFIXES = ("haiku_gpt.", "kernels.")  # hk.Module classes whose methods are checked


class ShapeCheckError(Exception):
    """A jaxtyping annotation did not hold during a preflight trace."""

    def __init__(self, function: str, error: Exception):
        self.function = function
        self.problem, self.dims = _summarise_typecheck_error(str(error))
        super().__init__(f"{function}: {self.problem}" + (f" (dims: {self.dims})" if self.dims else ""))


def _summarise_typecheck_error(message: str) -> tuple[str, str]:
    """jaxtyping's multi-paragraph message -> (what failed, the bound dimensions)."""
    head = message.split("----------------------")[0].replace("jaxlib._jax.Array", "Array")
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    if not lines:
        return message.strip(), ""
    # Line 0 is "Type-check error whilst checking the return value of pkg.fn.": keep "the return value".
    first = re.match(r"Type-check error whilst checking (.+?) of \S+?\.?$", lines[0])
    problem = f"{first.group(1)}: {' '.join(lines[1:])}" if first else " ".join(lines)
    dims = []
    marker = "jaxtyping axis annotation are as follows."
    if marker in message:
        for line in message.split(marker, 1)[1].splitlines():
            line = line.strip()
            if not line or "=" not in line or " " in line.split("=", 1)[0]:
                if dims:
                    break
                continue
            dims.append(line)
    return problem, ", ".join(dims)


def _checked(name: str, fn: Callable) -> Callable:
    """`fn` with its jaxtyping annotations checked by beartype; a failure raises ShapeCheckError(name)."""
    try:
        checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)(fn)
    except Exception:  # noqa: BLE001 (e.g. a lambda, which jaxtyping cannot wrap): run it unchecked
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except (jaxtyping.TypeCheckError, jaxtyping.AnnotationError) as e:
            raise ShapeCheckError(name, e) from None

    return wrapper


_checked_methods: dict = {}


def _checked_method(cls: type, method_name: str) -> Callable:
    wrapped = getattr(cls, method_name)
    key = (cls, method_name, wrapped)
    if key not in _checked_methods:
        raw = inspect.unwrap(wrapped)  # the method under Haiku's name-scope wrapper
        _checked_methods[key] = _checked(f"{cls.__module__}.{cls.__qualname__}.{method_name}", raw)
    return _checked_methods[key]


def _module_interceptor(next_fun, args, kwargs, context: hk.MethodContext):
    cls = context.orig_class
    if not cls.__module__.startswith(_CHECKED_MODULE_PREFIXES):
        return next_fun(*args, **kwargs)
    # We run inside Haiku's method wrapper (its name scope is entered): call the raw method, checked.
    return _checked_method(cls, context.method_name)(context.module, *args, **kwargs)


@contextlib.contextmanager
def shape_checks() -> Iterator[None]:
    """Within this context, the model's modules and the attention kernels check their annotations."""
    patched = []
    try:
        for module_name, attr in _KERNEL_FUNCTIONS:
            module = sys.modules.get(module_name)
            fn = getattr(module, attr, None) if module is not None else None
            if fn is None or not callable(fn) or inspect.ismodule(fn):
                continue
            patched.append((module, attr, fn))
            setattr(module, attr, _checked(f"kernels.{attr}", fn))
        with hk.intercept_methods(_module_interceptor):
            yield
    finally:
        for module, attr, fn in reversed(patched):
            setattr(module, attr, fn)


# ---------------------------------------------------------------------------
# Analytic estimate


def param_count(mcfg) -> int:
    """Every parameter of the model (position embeddings included, tied lm_head once)."""
    c, bias = mcfg.n_embd, int(mcfg.bias)
    layer_norm = c + bias * c
    per_layer = (2 * layer_norm
                 + 3 * c * c + bias * 3 * c  # c_attn
                 + c * c + bias * c          # attn c_proj
                 + 4 * c * c + bias * 4 * c  # c_fc
                 + 4 * c * c + bias * c)     # mlp c_proj
    return mcfg.vocab_size * c + mcfg.block_size * c + mcfg.n_layer * per_layer + layer_norm


def analytic_memory(config: ml_collections.ConfigDict, mcfg, devices: int = 1) -> dict[str, int]:
    """Bytes the train step needs per device, roughly: state (params, grads, AdamW mu, nu) + activations.

    With several devices the batch is split over them (data parallel), and with `fsdp` the state too.
    """
    n = param_count(mcfg)
    state = 4 * 4 * n  # float32 params, grads, mu, nu
    if config.gradient_accumulation_steps > 1:
        state += 4 * n  # the gradient accumulator of the scan
    if devices > 1 and config.get("fsdp", False):
        state = -(-state // devices)
    act_bytes = 2 if config.dtype == "bfloat16" else 4
    b, t, c, h = -(-config.batch_size // devices), config.block_size, mcfg.n_embd, mcfg.n_head
    tokens = b * t
    # Fitted to XLA's CPU memory plans (--mode=check) of the shakespeare_char configs, within 5%:
    per_layer = tokens * 18 * c * act_bytes  # ln, qkv, attention out, residuals, 4x MLP in and out
    if config.attention_impl != "pallas":  # [B, H, T, T] float32: scores, mask, softmax, their gradients
        per_layer += 6 * b * h * t * t * 4
    logits = 3 * tokens * mcfg.vocab_size * 4  # float32 logits, softmax and their gradient
    activations = mcfg.n_layer * per_layer + logits
    return {"params": n, "state": state, "activations": activations, "total": state + activations}


def flops_per_step(config: ml_collections.ConfigDict, mcfg) -> float:
    """nanoGPT's 6N + 12LHDT FLOPs per token, times the tokens of one optimizer step."""
    from haiku_gpt.model import flops_per_token  # noqa: PLC0415
    n = param_count(mcfg) - mcfg.block_size * mcfg.n_embd
    tokens = config.gradient_accumulation_steps * config.batch_size * config.block_size
    return flops_per_token(mcfg, n, config.block_size) * tokens


# ---------------------------------------------------------------------------
# The device's memory


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _host_available_bytes() -> int | None:
    available = None
    try:
        import psutil  # noqa: PLC0415 (optional)
        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    # A container's cgroup limit applies on top of the machine's memory.
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            room = limit - (_read_int(usage_file) or 0)
            available = room if available is None else min(available, room)
            break
    return available


def available_memory(device=None) -> tuple[int | None, str]:
    """(bytes available to this run on `device`, where the number comes from)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return _host_available_bytes(), "available host memory"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory stats)
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory limit"
    return None, "unknown"


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
    frames = [f for f in frames if not f.filename.endswith("preflight.py")]
    if not frames:
        return "JAX"
    f = frames[-1]
    return f"{os.path.basename(os.path.dirname(f.filename))}/{os.path.basename(f.filename)}:{f.lineno} ({f.name})"


def _cudnn_missing(stage: str, e: RuntimeError) -> Exception:
    """A UserError naming the fix when cuDNN is missing (jax checks its version while tracing
    dot_product_attention(implementation="cudnn")); any other RuntimeError as it is."""
    if "cudnn" not in str(e).lower():
        return e
    return UserError(
        f"preflight: the {stage} does not trace: {str(e).strip()} attention_impl='cudnn' needs the cuDNN library "
        "where the step is traced and compiled (cuDNN builds its attention graph at compile time): install "
        "cuDNN 9 (`pip install nvidia-cudnn-cu13`), or check the config with --config.attention_impl=pallas.")


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
        raise _cudnn_missing(stage, e) from None
    except (TypeError, ValueError, AssertionError) as e:  # jnp shape errors, chex shape assertions
        where = _innermost_project_frame(e.__traceback__)
        first = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise UserError(f"preflight: the {stage} does not trace: {type(e).__name__} in {where}: {first}. Nothing "
                        "was allocated; this is a bug in the model code or a config it does not support.") from None


def _target(config: ml_collections.ConfigDict):
    """(Target, its mesh) for `--config.target=...`, else (None, None): this machine's devices."""
    if not config.get("target"):
        return None, None
    from haiku_gpt import targets  # noqa: PLC0415 (the aot extra is optional)

    target = targets.parse_target(config.target)
    return target, targets.make_mesh(target)


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


def _compile_for_target(report: Report, target, trainer, state, tokens, config) -> None:
    """Compile the sharded train step for `target`'s compile-only devices; refuse it if it does not fit."""
    from haiku_gpt import targets  # noqa: PLC0415

    result = targets.compile_for(target, trainer.train_steps, state, tokens, tokens, kernels="flash_attention_")
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


def run(config: ml_collections.ConfigDict, *, compile: bool = False, log: Callable[[str], None] | None = None,
        vocab_size: int | None = None, valid_vocab: int | None = None) -> Report:
    """The preflight for `config` (validated here); raises UserError when the run cannot work.

    `compile=False` (the automatic preflight before training): analytic estimate + abstract traces.
    `compile=True` (`--mode=check`): also compile the train step for XLA's FLOPs and memory plan.
    """
    from haiku_gpt import pretrained, sample, train  # noqa: PLC0415
    from haiku_gpt.config import model_config, padded_vocab_size, validate  # noqa: PLC0415
    from haiku_gpt.data import open_dataset  # noqa: PLC0415
    from haiku_gpt.model import count_params  # noqa: PLC0415

    t0 = time.perf_counter()
    validate(config)
    config = pretrained.effective_config(config, log=lambda message: None)  # init_from=gpt2*: its shape
    if vocab_size is None and config.get("target") and config.vocab_size:
        vocab_size = valid_vocab = config.vocab_size  # compile-only: no dataset needed for the shapes
    if vocab_size is None:
        dataset = open_dataset(config.data_dir, config.dataset, config.block_size)
        vocab_size = padded_vocab_size(dataset.meta, config.vocab_size)
        valid_vocab = dataset.vocab_size
    mcfg = model_config(config, vocab_size)
    target, mesh = _target(config)
    if target is None:
        device = jax.devices()[0]
        available, source = available_memory(device)
        devices, device_desc = jax.device_count(), f"{device.platform} ({device.device_kind})"
    else:
        available, source = target.hbm_bytes, f"{target.device_kind} HBM per device"
        devices = target.num_devices
        device_desc = (f"{target.name}: {devices} x {target.device_kind}, compile-only (params and AdamW state "
                       f"{'sharded, fsdp' if config.fsdp else 'replicated'}; batch split over the devices)")
    analytic = analytic_memory(config, mcfg, devices)
    model_desc = (f"{mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} wide, block {mcfg.block_size}, "
                  f"vocab {mcfg.vocab_size}, batch {config.batch_size} x {config.gradient_accumulation_steps}, "
                  f"{config.dtype}, attention {config.attention_impl}")
    report = Report(
        config_name=config.config_name, model=model_desc, device=device_desc, devices=devices,
        params=analytic["params"], params_nanogpt=analytic["params"] - mcfg.block_size * mcfg.n_embd,
        analytic=analytic, analytic_flops=flops_per_step(config, mcfg), available=available,
        available_source=source, accumulation=config.gradient_accumulation_steps)
    if available is not None and analytic["total"] > available:
        _refuse(report, "analytic estimate: " + _bytes(analytic["state"]) + " of state + "
                + _bytes(analytic["activations"]) + " of activations", config)

    # Abstract traces: shapes only, nothing allocated. The attention cross-check (chex value
    # assertions) needs concrete values, so these traces leave it out: it changes no shape.
    check_config = ml_collections.ConfigDict(config.to_dict())
    check_config.check_attention = False
    try:
        trainer = train.make_trainer(check_config, vocab_size, mesh=mesh)
    except RuntimeError as e:
        raise _cudnn_missing("model", e) from None
    state = _trace("init", functools.partial(trainer.init, config.seed))
    report.params = sum(x.size for x in jax.tree.leaves(state.params))
    report.params_nanogpt = count_params(state.params)
    report.traced.append("init")
    batch = (1, config.gradient_accumulation_steps, config.batch_size, config.block_size)
    tokens = jax.ShapeDtypeStruct(batch, jnp.int32)
    _trace("train step", trainer.train_steps, state, tokens, tokens)
    report.traced.append("train step")
    eval_tokens = jax.ShapeDtypeStruct((config.eval_iters, config.batch_size, config.block_size), jnp.int32)
    _trace("eval step", trainer.eval_losses, state.params, eval_tokens, eval_tokens)
    report.traced.append("eval")
    generate = _checked("haiku_gpt.sample.generate_tokens", inspect.unwrap(sample.generate_tokens))
    decode = functools.partial(generate, config=trainer.model_config, max_new_tokens=1,
                               valid_vocab=valid_vocab or vocab_size)
    prompt = jax.ShapeDtypeStruct((1, min(2, config.block_size)), jnp.int32)
    _trace("decode step", decode, state.params, prompt, jax.ShapeDtypeStruct((2,), jnp.uint32))
    report.traced.append("decode")

    if compile and target is not None:
        _compile_for_target(report, target, trainer, state, tokens, config)
    elif compile:
        compiled = trainer.train_steps.lower(state, tokens, tokens).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops", -1) >= 0:
            report.compiled_flops = float(cost["flops"])
        mem = compiled.memory_analysis()
        if mem is not None:
            m = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                 "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes}
            # Everything live at once: the arguments, the outputs not written over donated
            # arguments, and the temporaries (XLA's own peak figure, where it has one, if larger).
            planned = m["argument"] + m["output"] - m["alias"] + m["temp"]
            m["peak"] = max(planned, getattr(mem, "peak_memory_in_bytes", 0) or 0)
            report.memory = m
            if available is not None and m["peak"] > available:
                _refuse(report, f"XLA's memory plan of the compiled step: arguments {_bytes(m['argument'])}, "
                                f"outputs {_bytes(m['output'])}, temporaries {_bytes(m['temp'])}", config)
    report.seconds = time.perf_counter() - t0
    if log is not None:
        log(report.summary_line())
    return report


def check(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> Report:
    """--mode=check: the whole preflight, printed as a table."""
    report = run(config, compile=True)
    log(f"preflight check ({report.seconds:.1f}s):")
    log(report.table())
    log("ok: this config fits and every traced shape agrees with its annotations.")
    return report
