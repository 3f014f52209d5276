"""A stand-in for `rax run`: our own short re-implementation of what the real rax does to a script.

The real rax ("safe JAX frontend", github.com/viraatdas/rax, read at commit
0a1c51b300b592e5cbd558591dfbc3eea698c301) installs only from its git repository (PyPI's `rax` is an
unrelated package), so CI does not have it. Each part names the rax file and function it mirrors;
checks, messages, signatures and exit codes are rax's. Left out: validate_jaxpr's special rewordings
(beartype dimension sizes, broadcasting, reshape, einsum, contracting dimensions: RAXShapeError with
their own text in rax, the general TypeError/ValueError/other classification here), the rewording of an
error from the call after a clean trace, `--verbose` output, and the placeholder commands (compile,
trace, lint, export: "not yet implemented", exit 1, in rax; argparse's exit 2 here).
Added for the tests: CALLS counts each patched op's calls (printed to stderr when run as a script).

    python tests/rax_standin.py run launch.py --config=configs/tiny.py ...   # like `rax run ...`
"""

import argparse
import functools
import inspect
import json
import sys
from pathlib import Path
from types import FunctionType
from typing import get_type_hints

import jax
import jax.numpy as jnp
import numpy as np


class RAXValidationError(Exception):  # rax/validator.py
    pass


class RAXShapeError(RAXValidationError):  # rax/validator.py
    pass


class RAXMathError(RAXValidationError):  # rax/validator.py
    pass


# --- rax/monkeypatch.py -------------------------------------------------------------------------
CALLS = {"dot": 0, "matmul": 0, "reshape": 0, "einsum": 0}
_original_ops = {}


def validate_shapes_binary(op_name, a, b):  # monkeypatch.validate_shapes_binary
    a_shape, b_shape = getattr(a, "shape", None), getattr(b, "shape", None)
    if a_shape is None or b_shape is None:
        return
    if len(a_shape) == 0 or len(b_shape) == 0:
        raise RAXShapeError(f"{op_name} requires non-scalar inputs, got shapes {a_shape} and {b_shape}")
    if op_name == "dot" and len(b_shape) == 1:
        if a_shape[-1] != b_shape[0]:
            raise RAXShapeError(f"dot shape mismatch: {a_shape} · {b_shape} "
                                f"(last dimension {a_shape[-1]} != {b_shape[0]})")
    elif a_shape[-1] != b_shape[-2]:  # dot with 2+-D b, and matmul always (even a 1-D b: IndexError, as rax)
        sign = "·" if op_name == "dot" else "@"
        raise RAXShapeError(f"{op_name} shape mismatch: {a_shape} {sign} {b_shape} "
                            f"(dimension {a_shape[-1]} != {b_shape[-2]})")


def validate_reshape(array, new_shape):  # monkeypatch.validate_reshape: an int new_shape -> TypeError
    if not hasattr(array, "shape"):
        return
    old_size = np.prod(array.shape)
    if -1 in new_shape:
        if list(new_shape).count(-1) > 1:
            raise RAXShapeError("Can only have one -1 dimension in reshape")
        known = int(np.prod([d for d in new_shape if d != -1]))
        if known * (old_size // known) != old_size:
            raise RAXShapeError(f"Cannot reshape array of size {old_size} to {new_shape}")
    elif old_size != np.prod(new_shape):
        raise RAXShapeError(f"Cannot reshape array of shape {array.shape} (size {old_size}) "
                            f"to shape {new_shape} (size {np.prod(new_shape)})")


def validate_einsum(subscripts, *operands):  # monkeypatch.validate_einsum: operand count only
    expected = subscripts.split("->")[0].count(",") + 1
    if len(operands) != expected:
        raise RAXShapeError(f"einsum expects {expected} operands for '{subscripts}', got {len(operands)}")


def _reraised(name, check, *args):  # the wrappers' `except RAXShapeError as e: raise RAXShapeError(f"[RAX] {e}")`
    CALLS[name] += 1
    try:
        check(*args)
    except RAXShapeError as e:
        raise RAXShapeError(f"[RAX] {e}")  # noqa: B904 (as rax: chained implicitly)


def apply_monkeypatch():  # monkeypatch.apply_monkeypatch, wrap_binary_op, wrap_reshape, wrap_einsum
    if _original_ops:
        return
    _original_ops.update(dot=jnp.dot, matmul=jnp.matmul, reshape=jnp.reshape, einsum=jnp.einsum)

    def binary(name, op):
        @functools.wraps(op)
        def wrapped(a, b, **kwargs):
            _reraised(name, validate_shapes_binary, name, a, b)
            return op(a, b, **kwargs)
        return wrapped

    @functools.wraps(_original_ops["reshape"])
    def reshape(array, new_shape, **kwargs):
        _reraised("reshape", validate_reshape, array, new_shape)
        return _original_ops["reshape"](array, new_shape, **kwargs)

    @functools.wraps(_original_ops["einsum"])
    def einsum(subscripts, *operands, **kwargs):
        _reraised("einsum", validate_einsum, subscripts, *operands)
        return _original_ops["einsum"](subscripts, *operands, **kwargs)

    jnp.dot, jnp.matmul = binary("dot", jnp.dot), binary("matmul", jnp.matmul)
    jnp.reshape, jnp.einsum = reshape, einsum


def remove_monkeypatch():  # monkeypatch.remove_monkeypatch
    for name, op in _original_ops.items():
        setattr(jnp, name, op)
    _original_ops.clear()


# --- rax/validator.py: validate_function, validate_jaxpr; rax/runner.py: LazyValidator, RAXNamespace, run_script
def _reworded(name, e):  # validator.validate_jaxpr's general cases (its special rewordings left out)
    message = str(e)
    if isinstance(e, TypeError):
        if "missing required positional argument" in message:
            return RAXValidationError(f"Invalid arguments for function '{name}': {e}")
        return RAXMathError(f"Type error in function '{name}': {e}")
    if isinstance(e, ValueError):
        if "shape" in message.lower() or "dimension" in message.lower():
            return RAXShapeError(f"Shape/dimension error in function '{name}': {e}")
        return RAXMathError(f"Math/logic error in function '{name}': {e}")
    return RAXValidationError(f"Validation failed for function '{name}': {e}")  # a RAXShapeError inside too


def validate_function(func, enable_jit=True):  # annotations required, beartype, make_jaxpr, jax.jit
    from beartype import beartype  # noqa: PLC0415

    name, hints = func.__name__, get_type_hints(func)
    if "return" not in hints or any(p not in hints and v.default is inspect.Parameter.empty
                                    for p, v in inspect.signature(func).parameters.items()):
        raise RAXValidationError(f"Function '{name}' is missing type annotations. All function parameters "
                                 "and return types must be annotated with jaxtyping shapes.")
    checked = beartype(func)

    @functools.wraps(func)
    def wrapped(*args, **kwargs):
        try:
            jax.make_jaxpr(checked)(*args, **kwargs)  # validate_jaxpr: trace first, reword what fails
        except Exception as e:  # noqa: BLE001
            raise _reworded(name, e) from None
        return checked(*args, **kwargs)
    return jax.jit(wrapped) if enable_jit else wrapped


class LazyValidator:  # runner.LazyValidator: validated (and jitted) on the first call
    def __init__(self, func, enable_jit=True):
        self._func, self._validated_func, self._enable_jit = func, None, enable_jit
        self.__name__, self.__doc__ = func.__name__, func.__doc__

    def __call__(self, *args, **kwargs):
        if self._validated_func is None:
            try:
                self._validated_func = validate_function(self._func, self._enable_jit)
            except RAXValidationError as e:
                raise RAXValidationError(f"[RAX] {e}")  # noqa: B904 (as rax: chained implicitly)
        return self._validated_func(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._func, name)


class RAXNamespace(dict):  # runner.RAXNamespace: exec's globals; wraps the script's public functions but `main`
    def __init__(self, enable_jit=True):
        super().__init__()
        self._enable_jit, self._wrapped_functions = enable_jit, set()

    def __setitem__(self, key, value):
        if (isinstance(value, FunctionType) and not key.startswith("_") and key not in self._wrapped_functions
                and key != "main" and value.__module__ in ("__main__", None)):
            value = LazyValidator(value, self._enable_jit)
            self._wrapped_functions.add(key)
        super().__setitem__(key, value)


def run_script(script_path, enable_jit=True, enable_monkeypatch=True):  # runner.run_script (returns the
    script_path = Path(script_path).resolve()                            # namespace, for the tests)
    if not script_path.exists():
        raise FileNotFoundError(f"Script not found: {script_path}")
    if enable_monkeypatch:
        apply_monkeypatch()
    try:
        script_dir = str(script_path.parent)
        if script_dir not in sys.path:
            sys.path.insert(0, script_dir)
        namespace = RAXNamespace(enable_jit)
        namespace.update(__name__="__main__", __file__=str(script_path), __doc__=None, __package__=None)
        exec(compile(script_path.read_text(), str(script_path), "exec"), namespace)  # noqa: S102
        return namespace
    finally:
        if enable_monkeypatch:
            remove_monkeypatch()
        if script_dir in sys.path:  # removed even when it was on sys.path before, as rax does
            sys.path.remove(script_dir)


# --- rax/cli.py: main, format_rax_error --------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(prog="rax")
    parser.add_argument("-v", "--version", action="version", version="%(prog)s 0.1.0")
    run = parser.add_subparsers(dest="command").add_parser("run")
    run.add_argument("script", type=str)
    run.add_argument("script_args", nargs=argparse.REMAINDER)  # everything after the script, --flags too
    for flag in ("--no-jit", "--no-monkeypatch", "--verbose"):
        run.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    if not Path(args.script).exists():
        print(f"Error: Script '{args.script}' not found.", file=sys.stderr)
        return 1
    try:  # SystemExit (absl's app.run ends in sys.exit) is no Exception: it propagates, with its code
        sys.argv = [args.script, *args.script_args]
        run_script(args.script, enable_jit=not args.no_jit, enable_monkeypatch=not args.no_monkeypatch)
        return 0
    except RAXValidationError as e:  # RAXShapeError and RAXMathError are subclasses
        message = str(e)
        print(message if message.startswith(("\n[RAX]", "[RAX]")) else f"[RAX] Error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[RAX] Interrupted by user", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        print(f"\n[RAX] Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # like rax's console script: sys.exit(main())
    try:
        sys.exit(main())
    finally:
        print("rax stand-in calls:", json.dumps(CALLS), file=sys.stderr)
