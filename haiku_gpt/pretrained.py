"""Start from OpenAI's GPT-2 weights in Hugging Face's format (nanoGPT's `init_from='gpt2*'`).

`init_from` is one of 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded
once from the Hugging Face Hub with `huggingface_hub`, then read from its cache),
or a local directory holding `config.json` and `model.safetensors` in the same
layout. Weights are read with `safetensors.numpy`: no torch needed.

The checkpoint fixes the model's shape: `effective_config` returns the run
config with n_layer, n_head, n_embd, bias and vocab_size taken from its
config.json, so everything downstream (model, checkpoint meta, MFU) sees the
right shape (GPT-2 has a key and a value head per query head: n_kv_head must be
0 or its n_head). A value of one of those fields given explicitly on the command
line (`--config.n_layer=...`) that differs from the checkpoint is refused; the
values a config file sets are replaced, as nanoGPT does. `dropout` and
`block_size` are the run's own: a block_size below the checkpoint's
n_positions crops the position table (nanoGPT's crop_block_size).

Hugging Face's GPT-2 stores its projections as Conv1D weights of shape
[in, out] (y = x @ W + b), which is exactly hk.Linear's `w`, so no transposes
are needed (nanoGPT transposes them only because torch's Linear is [out, in]).
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from haiku_gpt import checkpoint
from haiku_gpt.config import GPT2_NAMES, MODEL_FIELDS
from haiku_gpt.errors import UserError
from haiku_gpt.model import LAYER_NORM_EPS
from haiku_gpt.tokenizer import GPT2_VOCAB_SIZE, GPT2Tokenizer, Tokenizer, load_tokenizer, one_line, read_meta

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Fields the checkpoint fixes (block_size is the run's own, up to n_positions).
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "bias", "vocab_size")
# Buffers and the tied head that Hugging Face files may hold beside the parameters.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_pretrained(init_from: str) -> bool:
    """True for a GPT-2 name or a local Hugging Face directory (anything but scratch/resume)."""
    return init_from not in ("scratch", "resume")


# ---------------------------------------------------------------------------------------------
# Finding the files


def _hf_cache_dir() -> str:
    """Hugging Face's hub cache, resolved from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _download(name: str, filename: str, log: Callable[[str], None]) -> str:
    """`filename` of the Hub repository `name`: from the cache, else downloaded (resumable)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise UserError(
            f"--config.init_from={name} downloads GPT-2 from the Hugging Face Hub, which needs the "
            f"huggingface_hub package: `pip install huggingface_hub` (or pass a local directory "
            f"holding {CONFIG_FILE} and {WEIGHTS_FILE}: --config.init_from=/path/to/dir).") from e
    cache_dir = _hf_cache_dir()
    offline = _offline()
    try:  # the cache first: no network round trip when the file is there
        return hf_hub_download(name, filename, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 (not cached, or a damaged cache entry: try the Hub)
        if offline:
            raise UserError(
                f"--config.init_from={name}: {filename} of {name!r} is not in the Hugging Face cache "
                f"({cache_dir}) and HF_HUB_OFFLINE is set, so it cannot be downloaded. Unset "
                f"HF_HUB_OFFLINE to download it once, point HF_HOME (or HF_HUB_CACHE) at a cache that "
                f"holds it, or pass a local directory holding {CONFIG_FILE} and {WEIGHTS_FILE}: "
                f"--config.init_from=/path/to/dir.") from None
    if filename == WEIGHTS_FILE:
        log(f"downloading {name}'s {filename} from the Hugging Face Hub into {cache_dir} "
            "(once; an interrupted download resumes)")
    try:
        return hf_hub_download(name, filename, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 (network errors, missing repository, disk full, ...)
        raise UserError(
            f"--config.init_from={name}: could not download {filename} of {name!r} from the Hugging "
            f"Face Hub into {cache_dir} ({one_line(e)}). Check the network (or set HF_ENDPOINT for a "
            f"mirror), or, offline, set HF_HUB_OFFLINE=1 with a cache that holds it, or pass a local "
            f"directory holding {CONFIG_FILE} and {WEIGHTS_FILE}: --config.init_from=/path/to/dir.") from e


def checkpoint_file(init_from: str, filename: str, log: Callable[[str], None] = print) -> str:
    """Path of `filename` (config.json or model.safetensors) for a GPT-2 name or a local directory."""
    if init_from in GPT2_NAMES:
        return _download(init_from, filename, log)
    path = os.path.join(os.path.expanduser(init_from), filename)
    if not os.path.isdir(os.path.expanduser(init_from)):
        raise UserError(
            f"--config.init_from={init_from} is not 'scratch', 'resume', one of {', '.join(GPT2_NAMES)}, "
            f"or a directory: pass a directory holding {CONFIG_FILE} and {WEIGHTS_FILE} in Hugging "
            "Face's GPT-2 format.")
    if not os.path.isfile(path):
        raise UserError(
            f"--config.init_from={init_from}: {path} does not exist. A pretrained checkpoint directory "
            f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (Hugging Face's GPT-2 format; e.g. the files of "
            f"https://huggingface.co/gpt2).")
    return path


def read_hf_config(init_from: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The checkpoint's shape from its config.json: n_layer, n_head, n_embd, n_positions, vocab_size."""
    path = checkpoint_file(init_from, CONFIG_FILE, log)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--config.init_from={init_from}: cannot read {path} ({one_line(e)}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config.init_from={init_from}: {path} is not a JSON object.")
    out = {}
    for key, alternatives in (("n_layer", ()), ("n_head", ()), ("n_embd", ()),
                              ("n_positions", ("n_ctx",)), ("vocab_size", ())):
        value = next((raw[k] for k in (key, *alternatives) if k in raw), None)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UserError(
                f"--config.init_from={init_from}: {path} has {key}={value!r}, expected a positive "
                "integer (is it a GPT-2 config.json?).")
        out[key] = value
    if out["n_embd"] % out["n_head"]:
        raise UserError(f"--config.init_from={init_from}: {path} has n_embd={out['n_embd']} not divisible "
                        f"by n_head={out['n_head']}.")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    act = raw.get("activation_function", "gelu_new")
    if abs(eps - LAYER_NORM_EPS) > 1e-12 or act not in _TANH_GELUS:
        raise UserError(
            f"--config.init_from={init_from}: {path} has layer_norm_epsilon={eps} and "
            f"activation_function={act!r}; this model is GPT-2's (LayerNorm eps 1e-5, tanh-GELU "
            f"'gelu_new'), so its outputs would differ.")
    return out


# ---------------------------------------------------------------------------------------------
# The run config


def command_line_overrides() -> set[str]:
    """Top-level config fields given as --config.<field>=... on launch.py's command line."""
    try:
        from absl import flags
        from ml_collections import config_flags

        if not flags.FLAGS.is_parsed() or "config" not in flags.FLAGS:
            return set()
        return {name.split(".")[0] for name in config_flags.get_override_values(flags.FLAGS["config"])}
    except Exception:  # noqa: BLE001 (no absl flags in this process: nothing was given explicitly)
        return set()


def effective_config(config: ml_collections.ConfigDict, log: Callable[[str], None] = print,
                     explicit: set[str] | None = None) -> ml_collections.ConfigDict:
    """`config` with the model shape of the pretrained checkpoint it starts from (a copy; else `config`).

    `explicit`: fields the user set on purpose, which must agree with the checkpoint
    (default: those given on launch.py's command line). For `init_from='resume'` of a
    run that was started from a pretrained checkpoint, the shape comes from the
    checkpoint's meta.json.
    """
    explicit = command_line_overrides() if explicit is None else set(explicit)
    if config.init_from == "resume":
        return _resume_config(config, explicit)
    if not is_pretrained(config.init_from):
        return config
    hf = read_hf_config(config.init_from, log)
    arch = {"n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": hf["n_embd"], "bias": True,
            "vocab_size": hf["vocab_size"]}
    refused = [f"{f} (--config.{f}={config[f]!r}, the checkpoint has {arch[f]!r})"
               for f in ARCH_FIELDS if f in explicit and config[f] != arch[f]
               and not (f == "vocab_size" and config[f] == 0)]  # 0: "the default size"
    if refused:
        raise UserError(
            f"--config.init_from={config.init_from} fixes the model's shape, but {'; '.join(refused)}: "
            "drop those flags (the checkpoint's values are used), or train from scratch with "
            "--config.init_from=scratch. Only dropout and block_size (up to n_positions) may change.")
    if config.n_kv_head not in (0, hf["n_head"]):
        raise UserError(
            f"--config.init_from={config.init_from} starts from GPT-2, which has as many key/value heads as query "
            f"heads (n_head={hf['n_head']}: its c_attn weights hold a key and a value for every head), so "
            f"--config.n_kv_head={config.n_kv_head} (grouped-query attention) cannot load it: drop "
            "--config.n_kv_head (or set it to 0), or train a grouped-query model from scratch with "
            "--config.init_from=scratch.")
    if config.block_size > hf["n_positions"]:
        raise UserError(
            f"--config.block_size={config.block_size} is larger than the context of "
            f"--config.init_from={config.init_from} (n_positions={hf['n_positions']}): use at most "
            f"{hf['n_positions']} (a smaller block_size crops the position table).")
    replaced = [f"{f} {config[f]!r} -> {arch[f]!r}" for f in ARCH_FIELDS
                if config[f] != arch[f] and not (f == "vocab_size" and config[f] == 0)]
    log(f"init_from={config.init_from}: n_layer={arch['n_layer']}, n_head={arch['n_head']}, "
        f"n_embd={arch['n_embd']}, bias=True, vocab_size={arch['vocab_size']} from its {CONFIG_FILE}"
        + (f" (replacing the config's {', '.join(replaced)})" if replaced else "")
        + (f"; block_size {config.block_size} crops its {hf['n_positions']} positions"
           if config.block_size < hf["n_positions"] else ""))
    out = copy.deepcopy(config)
    for field, value in arch.items():
        out[field] = value
    return out


def _started_from(meta: dict | None) -> str | None:
    """The pretrained checkpoint a run's checkpoint descends from (through any number of resumes), or None."""
    if not isinstance(meta, dict):
        return None
    init_from = str((meta.get("config") or {}).get("init_from", "scratch"))
    return meta.get("pretrained_from") or (init_from if is_pretrained(init_from) else None)


def origin(config: ml_collections.ConfigDict) -> str | None:
    """What a checkpoint of this run records as `pretrained_from`: the GPT-2 it was finetuned from, or None."""
    if is_pretrained(config.init_from):
        return config.init_from
    if config.init_from == "resume":
        return _started_from(checkpoint.latest_meta(config.out_dir))
    return None


def _resume_config(config: ml_collections.ConfigDict, explicit: set[str]) -> ml_collections.ConfigDict:
    """Resuming a finetuned run: the model shape of its checkpoint (explicit flags still must agree)."""
    meta = checkpoint.latest_meta(config.out_dir)
    if _started_from(meta) is None or not isinstance(meta.get("model"), dict):
        return config
    out = copy.deepcopy(config)
    for field in MODEL_FIELDS:
        if field not in explicit and field in meta["model"]:
            out[field] = type(config[field])(meta["model"][field])
    return out


# ---------------------------------------------------------------------------------------------
# Parameters


def hf_key(module: str, name: str) -> str:
    """Haiku ('gpt/h_0/attn/c_attn', 'w') -> Hugging Face 'h.0.attn.c_attn.weight'."""
    if (module, name) == ("gpt", "wpe"):
        return "wpe.weight"
    parts = module.split("/")[1:]  # drop the "gpt" root
    parts = [f"h.{p[2:]}" if re.fullmatch(r"h_\d+", p) else p for p in parts]
    suffix = {"w": "weight", "scale": "weight", "embeddings": "weight", "b": "bias", "offset": "bias"}[name]
    return ".".join(parts + [suffix])


def load_params(init_from: str, template, log: Callable[[str], None] = print):
    """The checkpoint's weights as a Haiku params tree shaped like `template` (e.g. from jax.eval_shape)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = checkpoint_file(init_from, WEIGHTS_FILE, log)
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise UserError(
            f"--config.init_from={init_from}: cannot read {path} ({one_line(e)}); if it was downloaded, "
            "delete it from the Hugging Face cache and run again to download it anew.") from None
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    head, wte = tensors.get("lm_head.weight"), tensors.get("wte.weight")
    if head is not None and wte is not None and not np.array_equal(head, wte):
        log(f"warning: {path} has an lm_head.weight that differs from wte.weight; the model ties its head "
            "to the token embedding, so it is ignored.")
    del head, wte

    params, missing, wrong = {}, [], []
    for module, leaves in template.items():
        params[module] = {}
        for name, spec in leaves.items():
            key = hf_key(module, name)
            if key not in tensors:
                missing.append(key)
                continue
            value = tensors.pop(key)  # popped: the file's arrays are freed as they are converted
            if key == "wpe.weight" and value.ndim == 2 and value.shape[0] >= spec.shape[0]:
                # block_size < n_positions: crop the table (nanoGPT's crop_block_size)
                value = value[:spec.shape[0]] if value.shape[1] == spec.shape[1] else value
            if value.shape != tuple(spec.shape):
                wrong.append(f"{key}: the file has {tuple(value.shape)}, the model needs "
                             f"{tuple(spec.shape)} ({module}/{name})")
                continue
            params[module][name] = jnp.asarray(value, spec.dtype)
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise UserError(
            f"--config.init_from={init_from}: {path} has no tensor {shown}, which the model needs: it is "
            f"not a GPT-2 checkpoint of the shape its {CONFIG_FILE} describes.")
    if wrong:
        raise UserError(f"--config.init_from={init_from}: shapes in {path} do not match its {CONFIG_FILE}: "
                        + "; ".join(wrong[:5]) + ".")
    extra = sorted(k for k in tensors if not _IGNORED.search(k))
    if extra:
        shown = ", ".join(extra[:5]) + (f", ... ({len(extra)} in all)" if len(extra) > 5 else "")
        raise UserError(f"--config.init_from={init_from}: {path} has tensors this GPT-2 does not use "
                        f"({shown}): its {CONFIG_FILE} does not describe it.")
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(template))
    log(f"loaded {n / 1e6:.2f}M parameters from {path}")
    return params


def tokenizer_for(config: ml_collections.ConfigDict) -> Tokenizer:
    """Sampling straight from a pretrained checkpoint: GPT-2's BPE for a 50257-token model, else the dataset's."""
    if config.vocab_size == GPT2_VOCAB_SIZE:
        return GPT2Tokenizer()
    meta = read_meta(os.path.join(config.data_dir, config.dataset))
    if int(meta["vocab_size"]) > config.vocab_size:
        raise UserError(
            f"dataset {config.dataset!r} has {meta['vocab_size']} tokens but --config.init_from="
            f"{config.init_from} has a vocabulary of {config.vocab_size}: pick a dataset whose tokenizer fits.")
    return load_tokenizer(meta)
