"""Shape checks for abstract traces: the jaxtyping annotations of the model and the kernels, checked.

Inside `shape_checks()`, every method of the package's `hk.Module`s and the attention kernels run
with their jaxtyping annotations checked by beartype (`jaxtyping.jaxtyped`). A failure raises
`ShapeCheckError`, naming the function and the dimensions it disagreed on (jaxtyping's long
message summarised). The preflight (preflight.py) traces init, the train step, eval and decode
this way; training itself runs the same code unchecked, without the overhead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
from typing import Callable, Iterator

import beartype
import haiku as hk
import jaxtyping

# Kernel functions checked during the preflight: (module name, attribute). Both the package's
# re-exports (what model.py calls, `kernels.attention_qkv(...)`) and the defining modules' globals
# (what the dispatcher calls: `attention_qkv` calls `attention`) are patched.
_KERNEL_FUNCTIONS = (
    ("haiku_gpt.kernels", "attention"),
    ("haiku_gpt.kernels", "attention_qkv"),
    ("haiku_gpt.kernels", "reference_attention"),
    ("haiku_gpt.kernels", "cached_attention"),
    ("haiku_gpt.kernels.attention", "attention"),
    ("haiku_gpt.kernels.attention", "reference_attention"),
    ("haiku_gpt.kernels.flash_attention", "flash_attention"),
    ("haiku_gpt.kernels.flash_attention", "flash_attention_qkv"),
    ("haiku_gpt.kernels.reference", "dropout_keep_mask"),
)
_CHECKED_MODULE_PREFIXES = ("haiku_gpt.",)  # hk.Module classes whose methods are checked


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


def checked(name: str, fn: Callable) -> Callable:
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
        _checked_methods[key] = checked(f"{cls.__module__}.{cls.__qualname__}.{method_name}", raw)
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
            # Imported here (Pallas included) so that a kernel first imported during the trace is checked too.
            module = importlib.import_module(module_name)
            fn = getattr(module, attr)
            patched.append((module, attr, fn))
            setattr(module, attr, checked(f"haiku_gpt.kernels.{attr}", fn))
        with hk.intercept_methods(_module_interceptor):
            yield
    finally:
        for module, attr, fn in reversed(patched):
            setattr(module, attr, fn)
