"""Compile-only targets (haiku_gpt/aot/targets.py): names, devices, memory analysis and kernel resources.

The compile tests need the `aot` extra (libtpu, JAX's CUDA plugin) and are skipped, saying so,
without it; no GPU or TPU is needed. Each compile is shared through a module-scoped fixture.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_cuda, needs_tpu
from haiku_gpt import system
from haiku_gpt.aot import targets
from haiku_gpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# --- names (no extra needed) ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, name, platform, devices, chips", [
    ("a100", "a100", "cuda", 1, 1),
    ("h100", "h100", "cuda", 1, 1),
    ("H100x1", "h100", "cuda", 1, 1),
    ("a100x8", "a100x8", "cuda", 8, 8),
    ("h100x8", "h100x8", "cuda", 8, 8),
    ("tpu-v5e", "tpu-v5e:2x2", "tpu", 4, 4),
    ("tpu-v5e:2x4", "tpu-v5e:2x4", "tpu", 8, 8),
    ("tpu-v5e:4x4", "tpu-v5e:4x4", "tpu", 16, 16),
    (" tpu-v4:2x2x1 ", "tpu-v4:2x2x1", "tpu", 8, 4),  # v4: one device per TensorCore
    ("tpu-v5p:2x2x1", "tpu-v5p:2x2x1", "tpu", 4, 4),
    ("tpu-v6e:2x2", "tpu-v6e:2x2", "tpu", 4, 4),
])
def test_parse_target(spec, name, platform, devices, chips):
    target = targets.parse_target(spec)
    assert (target.name, target.platform, target.num_devices, target.num_chips) == (name, platform, devices, chips)
    assert targets.parse_target(target.name) == target
    assert target.hbm_bytes > 10 * 2**30 and target.peak_bf16_flops > 1e14


def test_per_device_specs():
    gib = 2**30
    hbm = {name: targets.parse_target(name).hbm_bytes for name in
           ("a100", "h100", "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e")}
    assert hbm == {"a100": 85_100_068_864, "h100": 85_520_809_984, "tpu-v4": 16 * gib,  # 32 GiB per v4 chip
                   "tpu-v5e": 16 * gib, "tpu-v5p": 95 * gib, "tpu-v6e": 32 * gib}
    assert targets.parse_target("tpu-v5e").vmem_bytes == 128 * 2**20
    assert targets.parse_target("h100").vmem_bytes is None


@pytest.mark.parametrize("spec", ["tpu-v5e:3x3", "h100x0", "h100x9", "b200", "tpu-v4:2x2", "tpu-v5p:3x2x1", ""])
def test_bad_target_is_one_paragraph_naming_the_choices(spec):
    with pytest.raises(ValueError) as info:
        targets.parse_target(spec)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert repr(spec) in message and "valid targets are" in message
    assert "h100xN" in message and "tpu-v5e" in message and "2x4" in message


@pytest.mark.parametrize("generation", ["a100", "h100"])
def test_gpu_spec_files_match_the_targets(generation):
    text = targets.gpu_spec_text(generation)
    target = targets.parse_target(generation)
    assert f"device_memory_size: {target.hbm_bytes}\n" in text
    assert f'device_description_str: "{target.device_kind}"' in text
    cores = int(re.search(r"core_count: (\d+)", text).group(1))
    assert cores == {"a100": 108, "h100": 132}[generation]


def test_missing_extra_names_the_fix(monkeypatch):
    real = importlib.metadata.version

    def version(package):
        if package in ("libtpu", "jax-cuda13-pjrt"):
            raise importlib.metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(targets.importlib.metadata, "version", version)
    for name, package in (("tpu-v5e:2x4", "libtpu"), ("h100x8", "jax-cuda13-pjrt")):
        with pytest.raises(targets.AotUnavailable) as info:
            targets.devices(name)
        message = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in message
        assert package in message and "pip install -e '.[aot]'" in message and name in message


# --- parsers, on canned compiler output (no extra needed) ----------------------------------------

PTXAS_OUTPUT = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline \
stage in the function 'flash_attention_dkdv'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_attention_dkdv' for 'sm_90a'
ptxas info    : Function properties for flash_attention_dkdv
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 226 registers, used 1 barriers, 48 bytes smem
"""


def test_parse_ptxas_output():
    report = targets._parse_ptxas(PTXAS_OUTPUT, ["flash_attention_dkdv"])["flash_attention_dkdv"]
    assert report["registers"] == 226 and report["static_shared_memory_bytes"] == 48
    assert (report["stack_frame_bytes"], report["spill_store_bytes"], report["spill_load_bytes"]) == (8, 16, 24)
    assert len(report["warnings"]) == 1 and "wgmma.mma_async instructions are serialized" in report["warnings"][0]


def test_tpu_kernels_from_hlo_text():
    config = ('backend_config={"scoped_memory_configs":[{"memory_space":"1","offset":"50331648","size":"16777216"}],'
              '"custom_call_config":{"body":"TUxJUgAB"},'
              '"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"52682752"}]}')
    hlo = (f'  %flash_attention_forward.1 = (bf16[1,2,128,64]) custom-call(%a), '
           f'custom_call_target="tpu_custom_call", {config}\n'
           '  %other = f32[2] custom-call(%b), custom_call_target="something_else"\n')
    (kernel,) = targets.tpu_kernels(hlo)
    assert kernel.name == "flash_attention_forward" and kernel.platform == "tpu"
    assert kernel.vmem_limit_bytes == 16 * 2**20
    assert kernel.vmem_bytes == 52682752 - 50331648  # the used range's end minus the kernel window's start


# --- compile-only devices and compiles (the aot extra) --------------------------------------------

@pytest.mark.parametrize("name, count, kind", [
    pytest.param("h100", 1, "NVIDIA H100 80GB HBM3", marks=needs_cuda),
    pytest.param("h100x8", 8, "NVIDIA H100 80GB HBM3", marks=needs_cuda),
    pytest.param("a100x8", 8, "NVIDIA A100-SXM4-80GB", marks=needs_cuda),
    pytest.param("tpu-v5e:2x4", 8, "TPU v5 lite", marks=needs_tpu),
    pytest.param("tpu-v5e:4x4", 16, "TPU v5 lite", marks=needs_tpu),
    pytest.param("tpu-v4:2x2x1", 8, "TPU v4", marks=needs_tpu),
    pytest.param("tpu-v5p:2x2x1", 4, "TPU v5", marks=needs_tpu),
    pytest.param("tpu-v6e:2x2", 4, "TPU v6 lite", marks=needs_tpu),
])
def test_devices_and_mesh(name, count, kind):
    found = targets.devices(name)
    assert len(found) == count == targets.parse_target(name).num_devices
    assert {d.device_kind for d in found} == {kind}
    assert targets.devices(name) is found  # cached
    mesh = targets.make_mesh(name)
    assert dict(mesh.shape) == {"data": count}


ROWS, WIDTH = 512, 256  # x [ROWS, WIDTH] float32 split over 'data'; w [WIDTH, WIDTH] replicated


def _matmul(name: str) -> targets.CompileResult:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = targets.make_mesh(name)
    x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data")))
    w = jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)  # replicated by default
    return targets.compile_for(name, lambda x, w: jnp.tanh(x @ w), x, w, donate_argnums=0)


@pytest.fixture(scope="module", params=[pytest.param("h100", marks=needs_cuda),
                                        pytest.param("tpu-v5e:2x2", marks=needs_tpu)])
def matmul(request) -> targets.CompileResult:
    return _matmul(request.param)


def test_matmul_memory_and_flops(matmul):
    n = matmul.target.num_devices
    rows = ROWS // n
    memory = matmul.memory
    assert memory.argument_bytes == 4 * (rows * WIDTH + WIDTH * WIDTH)  # per device: its rows, all of w
    assert memory.output_bytes == 4 * rows * WIDTH
    assert memory.alias_bytes == 4 * rows * WIDTH  # x was donated to the output
    assert memory.peak_bytes >= memory.argument_bytes and matmul.fits
    assert matmul.flops == pytest.approx(2 * rows * WIDTH * WIDTH, rel=0.05)
    assert matmul.flops_source == ("compiler" if matmul.target.platform == "tpu" else "hlo-cost-model")
    assert matmul.compile_seconds > 0 and matmul.kernels == ()


SEQ, HEAD_DIM = 128, 64


def _flash_forward(name: str) -> targets.CompileResult:
    import jax
    import jax.numpy as jnp

    from haiku_gpt.kernels.flash_attention import flash_attention

    qkv = jax.ShapeDtypeStruct((1, SEQ, 2, HEAD_DIM), jnp.bfloat16)
    return targets.compile_for(name, lambda q, k, v: flash_attention(q, k, v, interpret=False), qkv, qkv, qkv,
                               kernels="flash_attention_")


@pytest.fixture(scope="module")
def flash_h100() -> targets.CompileResult:
    return _flash_forward("h100")


@needs_cuda
@pytest.mark.skipif(targets.find_ptxas() is None, reason="ptxas not found (CUDA toolkit, or set $PTXAS)")
def test_triton_kernel_resources_from_ptxas(flash_h100):
    names = [k.name for k in flash_h100.kernels]
    assert names == ["flash_attention_forward"]  # only the prefix asked for; XLA's own fusions left out
    kernel = flash_h100.kernel("flash_attention_forward")
    assert kernel.platform == "cuda" and kernel.gpu_arch == "sm_90a"
    assert 0 < kernel.registers <= 255 and kernel.spill_store_bytes is not None
    assert kernel.dynamic_shared_memory_bytes > 0 and kernel.shared_memory_bytes >= kernel.dynamic_shared_memory_bytes
    assert kernel.threads_per_block % 32 == 0 and kernel.grid is not None
    assert not any("ptxas failed" in w for w in kernel.warnings)


@needs_tpu
def test_mosaic_kernel_vmem():
    result = _flash_forward("tpu-v5e:1x1")
    kernel = result.kernel("flash_attention_forward")
    assert kernel.platform == "tpu" and kernel.registers is None
    limit = kernel.vmem_limit_bytes or result.target.scoped_vmem_bytes
    assert 0 < kernel.vmem_bytes <= limit


# --- start-up -----------------------------------------------------------------------------------------

@pytest.mark.skipif(system.has_nvidia_gpu() or system.has_tpu() or system.has_amd_gpu(),
                    reason="an accelerator is attached: select_platforms leaves JAX_PLATFORMS to JAX")
def test_start_up_is_quiet_without_accelerators():
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_PLATFORMS" and not k.startswith("TPU_") and k != "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"}
    code = ("from haiku_gpt.system import select_platforms; chosen = select_platforms(); import jax; "
            "print(chosen, jax.default_backend())")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.split() == ["cpu", "cpu"]
    assert run.stderr == ""


_QUIETING = ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK", *system.QUIET_LIBTPU_ENV)


def test_importing_targets_leaves_the_environment_alone():
    """Importing haiku_gpt.aot.targets changes nothing in os.environ (an import has no side effects): the
    plugins' quieting defaults (system.quiet_absent_accelerators) are set when a target's devices are
    first built. The subprocess starts without them, so a default set at import would show."""
    env = {k: v for k, v in os.environ.items() if k not in _QUIETING}
    code = ("import json, os; before = dict(os.environ); import haiku_gpt.aot.targets; after = dict(os.environ); "
            "print(json.dumps({k: [before.get(k), after.get(k)] for k in before.keys() | after.keys() "
            "if before.get(k) != after.get(k)}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{}", run.stdout


@needs_cuda
@pytest.mark.skipif(system.has_nvidia_gpu(), reason="an NVIDIA GPU is attached: the CUDA plugin needs no quieting")
def test_a_target_compiles_with_nothing_set_before_the_import():
    """With nothing set before the import (no JAX_SKIP_CUDA_CONSTRAINTS_CHECK, no JAX_PLATFORMS), a GPU
    target's devices still build: the default is set when they are first built, before JAX's plugins load."""
    env = {k: v for k, v in os.environ.items() if k not in _QUIETING}
    code = "from haiku_gpt.aot import targets; print(len(targets.devices('h100x2')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "2"
