"""The pallas kernel's families (`--config.kernel_family`), and what each can run: checked before tracing
(config validation, the dispatcher) and by the kernel itself, with one message naming the fix.

  "auto":       `kernels.flash_attention`'s own kernels: Triton on a GPU, Mosaic on a TPU, the Pallas
                interpreter on a CPU.
  "mosaic_gpu": the Hopper family, `kernels.flash_attention_mgpu` (Pallas Mosaic GPU: wgmma, TMA), opt-in
                until a GPU has checked and timed it; H100/H200 (and JAX's Mosaic GPU interpreter on a
                CPU), 16-bit inputs, head_dim up to 128.

No Pallas import here: the dispatcher and config validation stay cheap to import.
"""

from __future__ import annotations

KERNEL_FAMILIES = ("auto", "mosaic_gpu")
MOSAIC_GPU_DTYPES = ("bfloat16", "float16")
MOSAIC_GPU_MAX_HEAD_DIM = 128  # its dK/dV kernel holds two [64, D] float32 accumulators: spills at 256
HOPPER_KINDS = ("H100", "H200", "H800")  # device_kind substrings of sm_90 GPUs


def is_hopper(device_kind: str) -> bool:
    return any(name in device_kind.upper() for name in HOPPER_KINDS)


def check_kernel_family(impl: str, family: str, *, platform: str | None = None, dtype: str | None = None,
                        head_dim: int | None = None, device_kind: str | None = None) -> None:
    """Raise ValueError, naming the fix, for a `kernel_family` that cannot run (see check_attention_impl)."""
    if family not in KERNEL_FAMILIES:
        raise ValueError(f"unknown kernel_family {family!r}; choose one of {', '.join(KERNEL_FAMILIES)} "
                         "(--config.kernel_family=auto: Triton on GPUs, Mosaic on TPUs)")
    if family == "auto":
        return
    if impl != "pallas":
        raise ValueError(f"kernel_family={family!r} picks the pallas kernel's GPU kernels, and attention_impl is "
                         f"{impl!r}: add --config.attention_impl=pallas, or leave --config.kernel_family=auto")
    if platform is not None and platform not in ("cpu", "gpu", "cuda"):
        raise ValueError(f"kernel_family='mosaic_gpu' compiles for NVIDIA Hopper GPUs (and is interpreted on a "
                         f"CPU), and this run is on {platform}: use --config.kernel_family=auto")
    if device_kind is not None and not is_hopper(device_kind):
        raise ValueError(f"kernel_family='mosaic_gpu' uses Hopper's wgmma and TMA (H100, H200), and this GPU is "
                         f"{device_kind!r}: use --config.kernel_family=auto (the Triton kernels)")
    if dtype is not None and dtype not in MOSAIC_GPU_DTYPES:
        raise ValueError(f"kernel_family='mosaic_gpu' takes bfloat16 or float16 inputs, not {dtype}: add "
                         "--config.dtype=bfloat16, or use --config.kernel_family=auto for float32")
    if head_dim is not None and head_dim > MOSAIC_GPU_MAX_HEAD_DIM:
        raise ValueError(f"kernel_family='mosaic_gpu' supports head_dim up to {MOSAIC_GPU_MAX_HEAD_DIM}, not "
                         f"{head_dim} (n_embd / n_head): use more heads, or --config.kernel_family=auto")
