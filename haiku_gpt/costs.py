"""What a model costs, from its shape alone: parameters, FLOPs, MFU, and the memory of a train step.

The one place these are computed: training's log lines, the preflight, and the benchmarks all
call these functions (nanoGPT's `get_num_params` and `estimate_mfu`, written for any shape).
`tests/test_model.py` checks `param_count` against the parameters the model really creates.
"""

from __future__ import annotations

import re
import time

import ml_collections

from haiku_gpt.model import GPTConfig


def param_count(mcfg: GPTConfig, position_embeddings: bool = False) -> int:
    """The model's parameters, the tied lm_head once; nanoGPT's count leaves out the position embeddings."""
    c, bias = mcfg.n_embd, int(mcfg.bias)
    qkv = c + 2 * mcfg.kv_heads * mcfg.head_dim  # c_attn's outputs: q, and k and v of KVH heads each (3C without GQA)
    layer_norm = c + bias * c
    per_layer = (2 * layer_norm
                 + c * qkv + bias * qkv      # c_attn
                 + c * c + bias * c          # attn c_proj
                 + 4 * c * c + bias * 4 * c  # c_fc
                 + 4 * c * c + bias * c)     # mlp c_proj
    total = mcfg.vocab_size * c + mcfg.block_size * c + mcfg.n_layer * per_layer + layer_norm
    return total if position_embeddings else total - mcfg.block_size * c


def flops_per_token(mcfg: GPTConfig, seq_len: int | None = None) -> float:
    """nanoGPT's estimate_mfu numerator (PaLM appendix B): 6N + 12 L H D T per token, forward and backward.

    H counts query heads: with grouped-query attention each query head still scores all T keys."""
    seq_len = mcfg.block_size if seq_len is None else seq_len
    return 6 * param_count(mcfg) + 12 * mcfg.n_layer * mcfg.n_head * mcfg.head_dim * seq_len


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    """Tokens in one optimizer step: micro-batches x batch x block."""
    return config.gradient_accumulation_steps * config.batch_size * config.block_size


def flops_per_step(config: ml_collections.ConfigDict, mcfg: GPTConfig) -> float:
    return flops_per_token(mcfg, config.block_size) * tokens_per_step(config)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of `peak_flops` (FLOP/s, all devices) one step achieves."""
    return flops_per_step / seconds_per_step / peak_flops


# Dense peak FLOP/s per device (no sparsity), from the vendors' datasheets: (device_kind pattern, lowercase,
# first match wins; bfloat16; float32). A float32 run's matmuls run at XLA's default precision: TF32 on
# NVIDIA's tensor cores, single bfloat16 passes on a TPU's MXU, so those are its peaks. A TPU v4 device is
# one chip (its two TensorCores as one megacore).
PEAK_FLOPS = (
    (r"h100 pcie", 756.5e12, 378e12),
    (r"h100 nvl", 835.5e12, 417.5e12),
    (r"h200 nvl", 835.5e12, 417.5e12),
    (r"h100|h200|gh200|h800", 989.4e12, 494.7e12),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    (r"a100|a800", 312e12, 156e12),  # SXM4 and PCIe alike
    (r"\bl4\b", 121e12, 60e12),
    (r"tpu v4", 275e12, 275e12),
    (r"tpu v5 lite|tpu v5e", 197e12, 197e12),
    (r"tpu v5", 459e12, 459e12),  # v5p: "TPU v5" / "TPU v5p"
    (r"tpu v6 lite|tpu v6e|tpu v6", 918e12, 918e12),
)


def datasheet_peak_flops(device_kind: str, dtype: str) -> float | None:
    """The dense peak FLOP/s of one device of `device_kind` (jax.devices()[0].device_kind) computing in
    `dtype`, or None for a kind the table does not know (a CPU, say)."""
    kind = device_kind.lower()
    for pattern, bf16, f32 in PEAK_FLOPS:
        if re.search(pattern, kind):
            return bf16 if dtype == "bfloat16" else f32
    return None


def peak_flops(configured: float, dtype: str) -> tuple[float, str]:
    """(FLOP/s of one device, where the number came from), the denominator of MFU: `configured`
    (--config.peak_flops) when set, else the datasheet's peak for this device kind and `dtype`, else
    (the CPU, an unknown accelerator) a measured `dtype` matmul."""
    if configured:
        return configured, "configured"
    import jax  # noqa: PLC0415

    kind = jax.devices()[0].device_kind
    peak = datasheet_peak_flops(kind, dtype)
    if peak is not None:
        return peak, f"{kind} datasheet, dense {dtype}"
    return measure_peak_flops(dtype), f"measured {dtype} matmul"


def measure_peak_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """This device's matmul rate in `dtype` (FLOP/s): the yardstick for MFU on a device of unknown peak."""
    import jax  # noqa: PLC0415 (measured only when asked: it runs on the device)
    import jax.numpy as jnp  # noqa: PLC0415

    a = jnp.ones((size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def analytic_memory(config: ml_collections.ConfigDict, mcfg: GPTConfig, devices: int = 1) -> dict[str, int]:
    """Bytes the train step needs per device, roughly: state (params, grads, AdamW mu, nu) + activations.

    With several devices the batch is split over them (data parallel), and with `fsdp` the state too.
    """
    n = param_count(mcfg, position_embeddings=True)
    state = 4 * 4 * n  # float32 params, grads, mu, nu
    if config.gradient_accumulation_steps > 1:
        state += 4 * n  # the gradient accumulator of the scan
    if devices > 1 and config.get("fsdp", False):
        state = -(-state // devices)
    act_bytes = 2 if config.dtype == "bfloat16" else 4
    b, t, c, h = -(-config.batch_size // devices), config.block_size, mcfg.n_embd, mcfg.n_head
    tokens = b * t
    # Fitted to XLA's CPU memory plans (--mode=check) of the shakespeare_char configs, within 5%:
    # (the GELU's tanh, 4C, is recomputed in the backward: XLA's plan dropped by exactly that, 27C -> 23C)
    per_layer = tokens * 14 * c * act_bytes  # ln, qkv, attention out, residuals, 4x MLP in and out
    if config.attention_impl != "pallas":  # [B, H, T, T] float32: scores, mask, softmax, their gradients
        per_layer += 6 * b * h * t * t * 4
    logits = 3 * tokens * mcfg.vocab_size * 4  # float32 logits, softmax and their gradient
    # --config.remat: each layer keeps only what the policy saves; one layer at a time is recomputed whole.
    kept = {"none": per_layer,
            "block": tokens * c * act_bytes,  # the block's input
            "dots": tokens * 9 * c * act_bytes}[mcfg.remat]  # the weight matmuls' outputs: qkv, projections, MLP
    activations = mcfg.n_layer * kept + (per_layer if mcfg.remat != "none" else 0) + logits
    return {"params": n, "state": state, "activations": activations, "total": state + activations}
