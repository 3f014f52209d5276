"""launch.py under a stand-in for `rax run` (tests/rax_standin.py; the real rax installs only from git).

rax patches jnp.dot / jnp.matmul (`(a, b, **kw)`, inner dimensions checked), jnp.reshape (`(array,
new_shape, **kw)`, sizes checked) and jnp.einsum (operand count checked), puts the script's directory
first on sys.path, and execs the script as `__main__`, wrapping every public top-level function it
defines except `main` with beartype and jax.jit. The self-tests below pin the stand-in to those
behaviours (each one differs from plain JAX or plain `python script.py`), so a call such as
`jnp.reshape(x, shape=...)` or a new public function in launch.py fails here as it would under rax.
"""

import ast
import json
import subprocess
import sys
import textwrap
from types import FunctionType

import jax.numpy as jnp
import pytest

from tests import rax_standin as rax
from tests.conftest import REPO


def test_launch_defines_only_main_and_private_helpers():
    tree = ast.parse((REPO / "launch.py").read_text())
    public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
              and not n.name.startswith("_")]
    assert public == ["main"]


def _standin_calls(stderr: str) -> dict:
    line = next(x for x in stderr.splitlines() if x.startswith("rax stand-in calls: "))
    return json.loads(line.removeprefix("rax stand-in calls: "))


def test_launch_trains_and_samples_under_rax_standin(data_dir, tmp_path):
    common = ["--config=configs/tiny.py", f"--config.data_dir={data_dir}", "--config.dataset=chars",
              f"--config.out_dir={tmp_path / 'out'}", "--config.max_iters=2", "--config.eval_interval=2",
              "--config.always_save_checkpoint=True"]
    runs = []
    for extra in ([], ["--mode=sample", "--config.sample.max_new_tokens=5"]):
        # As `rax run launch.py ...`: sys.path[0] is tests/, not the repository, until the stand-in adds it.
        result = subprocess.run([sys.executable, "tests/rax_standin.py", "run", "launch.py", *common, *extra],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs.append((result.stdout, _standin_calls(result.stderr)))
    (train_out, train_calls), (sample_out, sample_calls) = runs
    assert "saved checkpoint" in train_out and "mode: sample" in sample_out
    # The patched ops were on the path: hk.Linear and the tied lm_head call jnp.dot, the reference
    # attention jnp.einsum. (jnp.matmul and jnp.reshape count 0 today: the model reshapes with the
    # `x.reshape` method, which rax's patches do not reach.)
    for calls in (train_calls, sample_calls):
        assert calls["dot"] > 0 and calls["einsum"] > 0, calls


# --- the stand-in itself: it rejects what rax rejects --------------------------------------------------
@pytest.fixture
def patched():
    rax.apply_monkeypatch()
    try:
        yield
    finally:
        rax.remove_monkeypatch()


def test_reshape_is_checked_with_rax_signature(patched):
    x = jnp.ones((2, 3))
    assert jnp.reshape(x, (3, -1)).shape == (3, 2)
    with pytest.raises(TypeError, match="not iterable"):  # rax's `-1 in new_shape` on an int
        jnp.reshape(x, 6)
    with pytest.raises(TypeError, match="new_shape"):  # wrapper(array, new_shape, **kwargs)
        jnp.reshape(x, shape=(6,))
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] Cannot reshape array of shape \(2, 3\) \(size 6\) "
                                                 r"to shape \(4, 2\) \(size 8\)$"):
        jnp.reshape(x, (4, 2))
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] Cannot reshape array of size 6 to \(-1, 4\)$"):
        jnp.reshape(x, (-1, 4))
    with pytest.raises(rax.RAXShapeError, match="Can only have one -1"):
        jnp.reshape(x, (-1, -1))


def test_reshape_patch_is_removed():
    rax.apply_monkeypatch()
    rax.remove_monkeypatch()
    assert jnp.reshape(jnp.ones((2, 3)), 6).shape == (6,)  # plain JAX accepts an int shape


def test_dot_and_matmul_inner_dimensions_are_checked(patched):
    a, b = jnp.ones((2, 3)), jnp.ones((4, 5))
    assert jnp.dot(a, jnp.ones(3)).shape == (2,)
    assert jnp.dot(a, jnp.ones((3, 5)), preferred_element_type=jnp.float32).shape == (2, 5)
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] dot shape mismatch: \(2, 3\) · \(4, 5\) "
                                                 r"\(dimension 3 != 4\)$"):
        jnp.dot(a, b)
    with pytest.raises(rax.RAXShapeError, match=r"\(last dimension 3 != 4\)$"):
        jnp.dot(a, jnp.ones(4))
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] dot requires non-scalar inputs, got shapes \(\) and"):
        jnp.dot(jnp.float32(2), a)  # plain jnp.dot scales by a scalar
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] matmul shape mismatch: \(2, 3\) @ \(4, 5\) "):
        jnp.matmul(a, b)
    with pytest.raises(IndexError):  # rax reads b.shape[-2] for matmul even when b is 1-D
        jnp.matmul(a, jnp.ones(3))
    with pytest.raises(TypeError):  # wrapper(a, b, **kwargs): no third positional argument
        jnp.dot(a, jnp.ones(3), None)


def test_einsum_operand_count_is_checked(patched):
    x = jnp.ones((2, 3))
    before = rax.CALLS["einsum"]
    assert jnp.einsum("ij,jk->ik", x, x.T).shape == (2, 2)
    with pytest.raises(rax.RAXShapeError, match=r"^\[RAX\] einsum expects 2 operands for 'ij,jk->ik', got 1$"):
        jnp.einsum("ij,jk->ik", x)
    with pytest.raises(rax.RAXShapeError, match="expects 1 operands for 'ij', got 2"):
        jnp.einsum("ij", x, x)
    assert rax.CALLS["einsum"] == before + 3


SCRIPT = '''
import sys
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import sibling  # found only because the script's directory is on sys.path

PATH0, EINSUM = sys.path[0], jnp.einsum
traced = []

def double(x: Float[Array, "n"]) -> Float[Array, "n"]:
    traced.append(isinstance(x, jax.core.Tracer))
    return 2 * x

def unannotated(x):
    return x

def _private(x):
    return x

def main():
    return 0
'''


def test_script_functions_wrapped_as_rax_does(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", sys.path[:])
    (tmp_path / "sibling.py").write_text("")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    einsum = jnp.einsum
    ns = rax.run_script(str(script))
    assert (ns["__name__"], ns["__file__"], ns["__package__"]) == ("__main__", str(script.resolve()), None)
    assert ns["PATH0"] == str(tmp_path) and str(tmp_path) not in sys.path  # first during exec, removed after
    assert ns["EINSUM"].__wrapped__ is einsum is jnp.einsum  # patched during exec, restored after
    assert type(ns["double"]) is rax.LazyValidator and type(ns["unannotated"]) is rax.LazyValidator
    assert type(ns["main"]) is FunctionType and type(ns["_private"]) is FunctionType
    assert [float(v) for v in ns["double"](jnp.arange(3.0))] == [0.0, 2.0, 4.0]
    assert ns["traced"] and all(ns["traced"])  # jitted: the body saw tracers only
    with pytest.raises(rax.RAXValidationError, match=r"^\[RAX\] Function 'unannotated' is missing type annotations"):
        ns["unannotated"](jnp.ones(2))
    with pytest.raises(rax.RAXValidationError, match="Validation failed for function 'double'"):
        ns["double"](jnp.ones((2, 2)))  # beartype rejects a 2-D array for Float[Array, "n"]


@pytest.mark.parametrize("body, code, stderr", [
    ("print(sys.argv[1:])", 0, ""),
    ("jnp.einsum('ij,jk', jnp.ones((2, 2)))", 1, "[RAX] einsum expects 2 operands for 'ij,jk', got 1\n"),
    ("def f(x):\n    return x\nf(1)", 1, "[RAX] Function 'f' is missing type annotations."),
    ("raise ValueError('boom')", 1, "\n[RAX] Error: boom\n"),
    ("raise KeyboardInterrupt", 130, "\n[RAX] Interrupted by user\n"),
    ("raise SystemExit(3)", SystemExit, ""),  # not caught: the script's own exit code
])
def test_cli_exit_codes_and_messages(tmp_path, monkeypatch, capsys, body, code, stderr):
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    monkeypatch.setattr(sys, "path", sys.path[:])
    script = tmp_path / "s.py"
    script.write_text(f"import sys\nimport jax.numpy as jnp\n{textwrap.dedent(body)}\n")
    argv, dot = ["run", str(script), "--flag=1", "--verbose", "x"], jnp.dot  # all after the script go to it
    if code is SystemExit:
        with pytest.raises(SystemExit) as exit_info:
            rax.main(argv)
        assert exit_info.value.code == 3 and jnp.dot is dot and str(tmp_path) not in sys.path  # cleaned up
    else:
        assert rax.main(argv) == code
    out, err = capsys.readouterr()
    assert err.startswith(stderr)
    if body.startswith("print"):
        assert out == "['--flag=1', '--verbose', 'x']\n" and sys.argv == [str(script), "--flag=1", "--verbose", "x"]


def test_cli_missing_script(capsys):
    assert rax.main(["run", "no/such/script.py", "--x"]) == 1
    assert capsys.readouterr().err == "Error: Script 'no/such/script.py' not found.\n"
