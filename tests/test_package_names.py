"""The repository's kernels/ and configs/ are `haiku_gpt.kernels` and `haiku_gpt.configs`: the top-level
names `kernels` and `configs` stay free for other packages (Hugging Face's `kernels`, which transformers
imports, defines `CUDAProperties`).

Each check runs in a subprocess with stand-in top-level packages `kernels` and `configs` on PYTHONPATH,
ahead of this repository, from the repository root and from another directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

IMPORTS = ("from haiku_gpt.steps import make_steps\n"
           "from haiku_gpt.kernels import ATTENTION_IMPLS, attention\n"
           "from haiku_gpt.configs import tiny\n"
           "import haiku_gpt.kernels, haiku_gpt.configs\n"
           "import kernels, configs\n"
           "assert kernels.CUDAProperties is not None and configs.STAND_IN == 'configs'\n"
           "assert 'pallas' in ATTENTION_IMPLS and tiny.get_config().n_layer == 2\n"
           "print(haiku_gpt.kernels.__file__, haiku_gpt.configs.__file__, kernels.__file__, configs.__file__)\n")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stand-ins")
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text("CUDAProperties = object()\n")
    (root / "configs").mkdir()
    (root / "configs" / "__init__.py").write_text("STAND_IN = 'configs'\n")
    return root


def _installed_from_here(cwd: Path) -> bool:
    """Whether `import haiku_gpt` outside the checkout finds this checkout (an editable install from here)."""
    found = subprocess.run([sys.executable, "-c", "import haiku_gpt; print(haiku_gpt.__file__)"], cwd=cwd,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""), timeout=60)
    return found.returncode == 0 and Path(found.stdout.strip()).resolve().parent.parent == REPO.resolve()


def _env(stand_ins: Path, cwd: Path) -> dict:
    # The stand-ins first; this checkout after them when it is not what the installed haiku_gpt is.
    path = [str(stand_ins)] + ([] if cwd == REPO or _installed_from_here(cwd) else [str(REPO)])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), JAX_PLATFORMS="cpu")


@pytest.fixture(params=["repo-root", "elsewhere"])
def cwd(request, tmp_path) -> Path:
    return REPO if request.param == "repo-root" else tmp_path


def test_imports_beside_other_kernels_and_configs_packages(stand_ins, cwd):
    result = subprocess.run([sys.executable, "-c", IMPORTS], cwd=cwd, env=_env(stand_ins, cwd),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ours_kernels, ours_configs, their_kernels, their_configs = result.stdout.split()
    assert Path(ours_kernels).parent.name == "kernels" and Path(ours_configs).parent.name == "configs"
    assert Path(their_kernels).parent.parent == stand_ins and Path(their_configs).parent.parent == stand_ins


def test_the_repository_folders_are_not_the_top_level_names(cwd, tmp_path):
    """`import kernels` never gives the repository's folder, even from the repository root: another
    installed package of that name, or else ModuleNotFoundError."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for name in ("kernels", "configs"):
        result = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__file__)"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0:  # another package of that name is installed here
            assert REPO.resolve() not in Path(result.stdout.strip()).resolve().parents, (name, result.stdout)
        else:
            assert "ModuleNotFoundError" in result.stderr, (name, result.stderr)


def test_check_mode_beside_other_kernels_and_configs_packages(stand_ins, cwd, data_dir, tmp_path):
    config = "configs/tiny.py" if cwd == REPO else str(REPO / "configs" / "tiny.py")
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--mode=check", f"--config={config}",
         f"--config.data_dir={data_dir}", "--config.dataset=chars", f"--config.out_dir={tmp_path / 'out'}"],
        cwd=cwd, env=_env(stand_ins, cwd), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout, result.stdout
