"""launch.py under a stand-in for `rax run` (the real rax installs only from its git repository).

`rax run script.py args...` sets sys.argv, patches jnp.dot / jnp.matmul (wrappers taking
`(a, b, **kw)`), jnp.reshape (`(array, new_shape, **kw)`) and jnp.einsum, then execs the
script as `__main__`, wrapping every public top-level function the script defines except
`main` with shape checking and jit. This test does the same patching and exec, so a call
such as `jnp.reshape(x, shape=...)` anywhere on the training path fails here as it would
under rax, and checks that launch.py defines no public function but `main`.
"""

import ast
import subprocess
import sys

from tests.conftest import REPO

RAX_STANDIN = r'''
import sys
import jax.numpy as jnp

_dot, _matmul, _reshape, _einsum = jnp.dot, jnp.matmul, jnp.reshape, jnp.einsum
calls = {"dot": 0, "matmul": 0, "reshape": 0, "einsum": 0}

def dot(a, b, **kw):
    calls["dot"] += 1
    return _dot(a, b, **kw)

def matmul(a, b, **kw):
    calls["matmul"] += 1
    return _matmul(a, b, **kw)

def reshape(array, new_shape, **kw):
    calls["reshape"] += 1
    return _reshape(array, new_shape, **kw)

def einsum(subscripts, *operands, **kw):
    calls["einsum"] += 1
    return _einsum(subscripts, *operands, **kw)

jnp.dot, jnp.matmul, jnp.reshape, jnp.einsum = dot, matmul, reshape, einsum
script, *args = sys.argv[1:]
sys.argv = [script, *args]
with open(script) as f:
    code = compile(f.read(), script, "exec")
try:
    exec(code, {"__name__": "__main__", "__file__": script})
finally:
    print("rax stand-in calls:", calls, file=sys.stderr)
'''


def test_launch_defines_only_main_and_private_helpers():
    tree = ast.parse((REPO / "launch.py").read_text())
    public = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
              and not n.name.startswith("_")]
    assert public == ["main"]


def test_launch_trains_and_samples_under_rax_standin(data_dir, tmp_path):
    standin = tmp_path / "rax_standin.py"
    standin.write_text(RAX_STANDIN)
    common = ["--config=configs/tiny.py", f"--config.data_dir={data_dir}", "--config.dataset=chars",
              f"--config.out_dir={tmp_path / 'out'}", "--config.max_iters=4", "--config.eval_interval=2"]
    for extra in ([], ["--mode=sample", "--config.sample.max_new_tokens=5"]):
        result = subprocess.run([sys.executable, str(standin), "launch.py", *common, *extra], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "rax stand-in calls:" in result.stderr
    assert "'einsum': 0" not in result.stderr  # the patched functions really were on the path
