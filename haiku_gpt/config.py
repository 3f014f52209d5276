"""Checks on a run config, and the model shape derived from it and the dataset."""

from __future__ import annotations

import copy
import importlib.util
import os

import ml_collections

from haiku_gpt.errors import UserError
from haiku_gpt.model import REMAT_POLICIES, GPTConfig
from haiku_gpt.system import CPU_MATMUL_LIBRARIES
from haiku_gpt.kernels import ATTENTION_IMPLS, check_attention_impl

LR_SCHEDULES = ("cosine", "wsd", "constant")  # optimizer.lr_schedule
WSD_DECAY_SHAPES = ("linear", "1-sqrt")

DTYPES = ("auto", "float32", "bfloat16")  # auto: bfloat16 on a GPU or TPU, float32 on the CPU (nanoGPT's choice)
INIT_FROM = ("scratch", "resume")
# OpenAI's GPT-2 checkpoints on the Hugging Face Hub (haiku_gpt/pretrained.py); a local directory works too.
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SAMPLE_WINDOWS = ("exact", "half")
EVAL_TASKS = ("loss", "hellaswag")  # --mode=eval: evaluate.py, hellaswag.py
# Fields that fix the parameter shapes: a checkpoint must agree on all of them.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "n_kv_head", "block_size", "bias", "vocab_size")


def padded_vocab_size(meta: dict, requested: int = 0) -> int:
    """The embedding's row count: BPE's 50257 is padded to a multiple of 64 (50304), as nanoGPT."""
    vocab = int(meta["vocab_size"])
    if requested:
        if requested < vocab:
            raise UserError(
                f"vocab_size={requested} (--config.vocab_size, or a pretrained checkpoint's) is smaller than "
                f"the dataset's vocabulary ({vocab}): leave --config.vocab_size at 0 to take the dataset's "
                f"size, or pick a dataset whose tokenizer fits the pretrained model.")
        return requested
    if meta.get("tokenizer") == "gpt2":
        return -(-vocab // 64) * 64
    return vocab


def _platform(config: ml_collections.ConfigDict, mesh=None) -> str | None:
    """The platform the run compiles for, where it matters (cuDNN attention, a kernel family other than auto):
    the target's, or this one's."""
    needed = config.attention_impl == "cudnn" or config.kernel_family != "auto"
    return run_platform(config, mesh) if needed else None


def _device_kind(config: ml_collections.ConfigDict, mesh=None) -> str | None:
    """The GPU the run compiles for, where it matters (kernel_family='mosaic_gpu' needs a Hopper one)."""
    if config.kernel_family == "auto" or _platform(config, mesh) != "gpu":
        return None
    if mesh is not None:
        return mesh.devices.flat[0].device_kind
    import jax  # noqa: PLC0415

    return jax.devices()[0].device_kind


def resolve_dtype(dtype: str, platform: str) -> str:
    """--config.dtype=auto -> 'bfloat16' on a GPU or TPU (as nanoGPT picks bfloat16 where the GPU has it),
    'float32' on the CPU, whose XLA backend runs bfloat16 matmuls no faster."""
    if dtype != "auto":
        return dtype
    return "float32" if platform == "cpu" else "bfloat16"


def run_platform(config: ml_collections.ConfigDict, mesh=None) -> str:
    """'cpu', 'gpu' or 'tpu': what the run compiles for: `mesh`'s devices (--config.target's compile-only
    devices, which the preflight resolves: `preflight.target_mesh`), else this process's backend."""
    if mesh is not None:
        platform = mesh.devices.flat[0].platform
    elif config.target:
        raise UserError(f"--config.target={config.target} compiles for hardware that is not here: it works only "
                        "with --mode=check, which resolves the target's devices.")
    else:
        import jax  # noqa: PLC0415 (after jax.distributed.initialize)

        platform = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def resolved(config: ml_collections.ConfigDict, mesh=None) -> ml_collections.ConfigDict:
    """`config` with its automatic choices made for the run's platform (dtype=auto): a copy, or `config` itself
    when nothing is automatic. What every mode and the logs then see."""
    if config.dtype != "auto":
        return config
    config = copy.deepcopy(config)
    config.dtype = resolve_dtype("auto", run_platform(config, mesh))
    return config


def profile_window(value: str) -> tuple[int, int] | None:
    """--config.profile_steps=START,STOP -> (START, STOP): trace steps START..STOP-1; '' -> None."""
    if not value:
        return None
    parts = str(value).split(",")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        start, stop = -1, -1
    if len(parts) != 2 or not 0 <= start < stop:
        raise UserError(f"--config.profile_steps={value!r} must be START,STOP with 0 <= START < STOP, e.g. "
                        "--config.profile_steps=10,15 to trace steps 10 to 14.")
    return start, stop


def validate(config: ml_collections.ConfigDict, mesh=None) -> None:
    """Raise UserError for anything that would fail later, before any work is done. `mesh`: the compile-only
    devices of --config.target (`preflight.target_mesh`), whose platform decides dtype=auto and cuDNN."""
    def bad(msg: str) -> None:
        raise UserError(msg)

    for field in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                  "eval_iters", "log_interval", "eval_interval"):
        if config[field] <= 0:
            bad(f"--config.{field}={config[field]} must be a positive integer.")
    if config.n_embd % config.n_head:
        bad(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}: each head gets "
            f"n_embd // n_head channels, so pick e.g. --config.n_head={_divisor_near(config.n_embd, config.n_head)}.")
    if config.n_kv_head < 0 or (config.n_kv_head and config.n_head % config.n_kv_head):
        divisors = ", ".join(str(d) for d in range(1, config.n_head + 1) if config.n_head % d == 0)
        bad(f"--config.n_kv_head={config.n_kv_head} does not divide n_head={config.n_head}: grouped-query attention "
            f"shares each key/value head among n_head // n_kv_head query heads, so pick one of {divisors} (1: "
            "multi-query attention), or 0 for as many key/value heads as query heads (GPT-2's attention).")
    if not 0.0 <= config.dropout < 1.0:
        bad(f"--config.dropout={config.dropout} must be in [0, 1).")
    if config.dtype not in DTYPES:
        bad(f"--config.dtype={config.dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    config = resolved(config, mesh)  # dtype=auto: the run's
    try:
        check_attention_impl(config.attention_impl, config.dropout, platform=_platform(config, mesh),
                             dtype=config.dtype, kernel_family=config.kernel_family,
                             head_dim=config.n_embd // config.n_head, device_kind=_device_kind(config, mesh))
    except ValueError as e:
        bad(f"{e}.")
    if config.init_from not in INIT_FROM + GPT2_NAMES and not os.path.isdir(os.path.expanduser(config.init_from)):
        bad(f"--config.init_from={config.init_from!r} is not one of {', '.join(INIT_FROM + GPT2_NAMES)}, nor a "
            "directory holding a pretrained GPT-2 (config.json and model.safetensors).")
    if config.max_iters < 0:
        bad(f"--config.max_iters={config.max_iters} must be >= 0.")
    if config.learning_rate <= 0 or config.min_lr < 0:
        bad("--config.learning_rate must be > 0 and --config.min_lr >= 0.")
    if config.lr_schedule not in LR_SCHEDULES:
        bad(f"--config.lr_schedule={config.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}.")
    if config.wsd_decay_shape not in WSD_DECAY_SHAPES:
        bad(f"--config.wsd_decay_shape={config.wsd_decay_shape!r} is not one of {', '.join(WSD_DECAY_SHAPES)}.")
    if not 0.0 < config.wsd_decay_fraction <= 1.0:
        bad(f"--config.wsd_decay_fraction={config.wsd_decay_fraction} must be in (0, 1]: the final fraction of "
            "the run (after warmup) over which wsd decays, e.g. 0.2.")
    if config.decay_lr and config.lr_schedule != "constant" and config.lr_decay_iters <= config.warmup_iters:
        bad(f"--config.lr_decay_iters={config.lr_decay_iters} must be larger than --config.warmup_iters="
            f"{config.warmup_iters}: the {config.lr_schedule} schedule decays between the two.")
    if config.wandb_log and importlib.util.find_spec("wandb") is None:
        bad("--config.wandb_log=True needs the wandb package, which is not installed: `pip install wandb` (or "
            "`pip install -e '.[wandb]'`), or drop --config.wandb_log; WANDB_MODE=offline logs without a network.")
    profile_window(config.profile_steps)
    if config.skip_spikes and (config.spike_window < 2 or config.spike_z <= 0):
        bad(f"--config.skip_spikes needs --config.spike_window >= 2 (now {config.spike_window}) and --config.spike_z "
            f"> 0 (now {config.spike_z}): the z-score of a step's loss and gradient norm over that many recent steps.")
    if config.remat not in REMAT_POLICIES:
        bad(f"--config.remat={config.remat!r} is not one of {', '.join(REMAT_POLICIES)}: 'block' recomputes each "
            "transformer block in the backward pass, 'dots' keeps only its matmul outputs.")
    tokens = config.batch_size * config.block_size
    if config.loss_chunk_tokens < 0 or (config.loss_chunk_tokens and tokens % config.loss_chunk_tokens):
        bad(f"--config.loss_chunk_tokens={config.loss_chunk_tokens} must divide the {tokens} tokens of a batch "
            f"(batch_size x block_size), e.g. {tokens // 8 if tokens % 8 == 0 else tokens}; 0 chooses chunks of at "
            "most 512 MiB of logits.")
    if config.keep_checkpoints < 1:
        bad(f"--config.keep_checkpoints={config.keep_checkpoints} must be at least 1.")
    if config.steps_per_call < 1:
        bad(f"--config.steps_per_call={config.steps_per_call} must be >= 1.")
    if config.eval_task not in EVAL_TASKS:
        bad(f"--config.eval_task={config.eval_task!r} is not one of {', '.join(EVAL_TASKS)}: what --mode=eval "
            "reports, the train/val loss or HellaSwag's acc and acc_norm.")
    if config.hellaswag_limit < 0:
        bad(f"--config.hellaswag_limit={config.hellaswag_limit} must be >= 0 (0: every example).")
    if config.cpu_matmul_library not in CPU_MATMUL_LIBRARIES:
        bad(f"--config.cpu_matmul_library={config.cpu_matmul_library!r} is not one of "
            f"{', '.join(CPU_MATMUL_LIBRARIES)}.")


def validate_sample(config: ml_collections.ConfigDict, vocab_size: int) -> None:
    s = config.sample
    if s.max_new_tokens <= 0:
        raise UserError(f"--config.sample.max_new_tokens={s.max_new_tokens}: it must be a positive number "
                        "of tokens to generate.")
    if s.num_samples <= 0:
        raise UserError(f"--config.sample.num_samples={s.num_samples} must be positive.")
    if s.temperature <= 0:
        raise UserError(f"--config.sample.temperature={s.temperature} must be > 0 (use e.g. 1e-3 for "
                        "near-greedy decoding).")
    if s.top_k is not None and s.top_k > vocab_size:
        raise UserError(f"--config.sample.top_k={s.top_k} is larger than the vocabulary ({vocab_size} "
                        f"tokens): use at most {vocab_size}, or 0 to sample from the whole vocabulary.")
    if s.top_k is not None and s.top_k < 0:
        raise UserError(f"--config.sample.top_k={s.top_k} must be >= 0 (0: no top-k filtering).")
    if s.window not in SAMPLE_WINDOWS:
        raise UserError(f"--config.sample.window={s.window!r} is not one of {', '.join(SAMPLE_WINDOWS)}.")


def attention_desc(config: ml_collections.ConfigDict) -> str:
    """The attention the run uses, as its logs name it: 'pallas', or 'pallas (mosaic_gpu kernels)'."""
    family = config.get("kernel_family", "auto")
    named = family != "auto" and config.attention_impl == "pallas"
    return config.attention_impl + (f" ({family} kernels)" if named else "")


def kv_heads(config: ml_collections.ConfigDict) -> int:
    """The run's key/value heads: --config.n_kv_head, or n_head when it is 0."""
    return config.n_kv_head or config.n_head


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, n_kv_head=kv_heads(config), dropout=config.dropout,
        bias=config.bias, attention_impl=config.attention_impl, kernel_family=config.kernel_family,
        check_attention=config.check_attention,
        remat=config.remat, loss_chunk_tokens=config.loss_chunk_tokens)


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


__all__ = ["ATTENTION_IMPLS", "GPT2_NAMES", "MODEL_FIELDS", "attention_desc", "kv_heads", "model_config",
           "padded_vocab_size", "validate", "validate_sample"]
