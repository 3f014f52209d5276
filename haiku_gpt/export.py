"""`--mode=export`: out_dir's checkpoint as a Hugging Face GPT-2 (the inverse of pretrained.py).

The export directory (--config.export_dir, default out_dir/hf) holds

  config.json        GPT2Config: n_layer, n_head, n_embd, n_positions = block_size, vocab_size,
                     layer_norm_epsilon 1e-5, activation_function 'gelu_new' (model.py's tanh GELU),
                     tie_word_embeddings, and "haiku_gpt_export" (where and at which step it came from)
  model.safetensors  float32 tensors under GPT2LMHeadModel's names, as its save_pretrained writes them:
                       transformer.wte.weight [V, C]    transformer.wpe.weight [block_size, C]
                       transformer.h.N.ln_1.{weight,bias}     transformer.h.N.attn.c_attn.{weight,bias}
                       transformer.h.N.attn.c_proj.{...}      transformer.h.N.ln_2.{...}
                       transformer.h.N.mlp.c_fc.{...}         transformer.h.N.mlp.c_proj.{...}
                       transformer.ln_f.{weight,bias}
  meta.json          character-level models only: the dataset's meta.json (itos/stoi: the vocabulary)

and loads with `transformers.GPT2LMHeadModel.from_pretrained(DIR)`, or back into haiku_gpt with
`--config.init_from=DIR`. The names come from `pretrained.hf_key`, the one mapping both directions
use. Hugging Face's Conv1D weights are [in, out], as hk.Linear's `w`: nothing is transposed.

  - The tied head: the model's logits are against wte, as GPT2LMHeadModel's are. As its
    save_pretrained does, no lm_head.weight is written; tie_word_embeddings=true makes
    from_pretrained tie lm_head to wte.
  - The vocabulary: only the real tokens' rows of wte are written (exp.valid_vocab): GPT-2's BPE,
    padded to 50304 rows for training, is exported with its 50257.
  - bias=False models are exported with zero biases (every Linear's bias and LayerNorm's offset):
    Hugging Face's GPT-2 always has them, and adding zero gives the bias-free model's outputs
    exactly.
  - Tokenizers: GPT-2's BPE (bos/eos = <|endoftext|>, 50256: the `gpt2` tokenizer of the Hub
    fits), or "char", whose vocabulary goes beside the weights in meta.json. Any other is refused.
  - Grouped-query attention (--config.n_kv_head below n_head) is refused: Hugging Face's GPT-2
    has no such option (its c_attn is always [C, 3C], a key and a value head per query head).

The files are written into a hidden directory beside export_dir and renamed into place, so
export_dir never holds a half-written export; a directory there that is not a previous export
(with nothing else in it) is never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from haiku_gpt import pretrained
from haiku_gpt.config import kv_heads
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import Experiment
from haiku_gpt.model import LAYER_NORM_EPS, GPTConfig, make_model
from haiku_gpt.system import fsync_dir
from haiku_gpt.tokenizer import GPT2_VOCAB_SIZE, META_FILE, one_line

CONFIG_FILE, WEIGHTS_FILE = pretrained.CONFIG_FILE, pretrained.WEIGHTS_FILE
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)
EXPORT_KEY = "haiku_gpt_export"  # in config.json: marks a directory this module wrote
PREFIX = "transformer."  # GPT2LMHeadModel's name for the GPT2Model inside it
END_OF_TEXT = 50256  # GPT-2's <|endoftext|>: its bos and eos


def export_dir(config: ml_collections.ConfigDict) -> str:
    return os.path.expanduser(config.export_dir or os.path.join(config.out_dir, "hf"))


def export_checkpoint(exp: Experiment) -> str:
    """--mode=export: out_dir's newest intact checkpoint, written as Hugging Face GPT-2; returns the directory."""
    dest = export_dir(exp.config)
    check_destination(dest)
    tokenizer = check_tokenizer(exp.dataset.meta, exp.dataset.name)
    check_attention_heads(exp.config)
    state, meta = exp.restore()
    step = int(meta["step"])
    params = state.params
    if jax.process_count() > 1:  # fsdp over several processes: gather whole arrays (a collective: every process)
        from jax.experimental import multihost_utils  # noqa: PLC0415
        params = multihost_utils.process_allgather(params, tiled=True)
    tensors = hf_tensors(params, exp.model_config, exp.valid_vocab)
    hf_config = gpt2_config(exp.config, exp.valid_vocab, tokenizer,
                            {"out_dir": exp.config.out_dir, "step": step, "dataset": exp.dataset.name,
                             "tokenizer": tokenizer})
    if exp.is_main:  # several processes: each restored the same checkpoint, process 0 writes
        meta_file = os.path.join(exp.dataset.path, META_FILE) if tokenizer == "char" else None
        _write_aside(dest, hf_config, tensors, meta_file)
        what = (f"; the vocabulary ({exp.valid_vocab} characters) is in its {META_FILE}"
                if meta_file else f" (GPT-2's BPE, {exp.valid_vocab} tokens)")
        exp.log(f"exported step {step} of {exp.config.out_dir} as Hugging Face GPT-2 to {dest}{what}")
    return dest


def check_tokenizer(meta: dict, dataset: str) -> str:
    """'gpt2' or 'char', the tokenizers an export can carry; UserError for any other (or a resized BPE)."""
    kind, size = meta.get("tokenizer"), meta.get("vocab_size")
    if kind == "char" or (kind == "gpt2" and size == GPT2_VOCAB_SIZE):
        return kind
    raise UserError(
        f"--mode=export writes Hugging Face's GPT-2, whose tokenizer is GPT-2's BPE ({GPT2_VOCAB_SIZE} tokens), "
        f"or a character-level vocabulary written beside it in {META_FILE}; dataset {dataset!r} was prepared "
        f"with tokenizer {kind!r} ({size} tokens), which neither describes. Export a model trained on a "
        "dataset prepared with `--tokenizer gpt2` or `--tokenizer char` (data/text/prepare.py).")


def check_attention_heads(config: ml_collections.ConfigDict) -> None:
    """UserError for a grouped-query model (n_kv_head below n_head), which Hugging Face's GPT-2 cannot hold."""
    if kv_heads(config) != config.n_head:
        raise UserError(
            f"--mode=export writes Hugging Face's GPT-2, whose attention has a key and a value head for each of "
            f"its n_head query heads (c_attn is [n_embd, 3 * n_embd]; GPT2Config has no option for fewer), but "
            f"this model has --config.n_kv_head={config.n_kv_head} key/value heads for n_head={config.n_head} "
            "(grouped-query attention), so it has no GPT-2 form. Keep its checkpoint for haiku_gpt "
            "(--mode=sample, --mode=eval), or train with --config.n_kv_head=0 to export.")


def hf_tensors(params, model_config: GPTConfig, n_vocab: int) -> dict[str, np.ndarray]:
    """The Haiku params as GPT2LMHeadModel's float32 tensors: biases of a bias-free model are zeros, wte keeps
    its first n_vocab rows (the real tokens) and the tied head is not written."""
    full = jax.eval_shape(make_model(dataclasses.replace(model_config, bias=True, remat="none")).init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    tensors = {}
    for module, leaves in full.items():
        for name, spec in leaves.items():
            value = params.get(module, {}).get(name)
            if value is None:  # only biases are absent, in a bias=False model: zero reproduces it exactly
                assert name in ("b", "offset"), f"{module}/{name} is missing from the checkpoint's params"
                value = np.zeros(spec.shape, np.float32)
            key = pretrained.hf_key(module, name)
            value = np.asarray(value, np.float32)
            tensors[PREFIX + key] = np.ascontiguousarray(value[:n_vocab] if key == "wte.weight" else value)
    return tensors


def gpt2_config(config: ml_collections.ConfigDict, n_vocab: int, tokenizer: str, provenance: dict) -> dict:
    """config.json: Hugging Face's GPT2Config fields for this model (the Hub's gpt2 config.json, resized)."""
    end_of_text = END_OF_TEXT if tokenizer == "gpt2" else None  # a char vocabulary has no such token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": n_vocab,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as model.py's MLP
        "activation_function": "gelu_new",  # model.py's jax.nn.gelu(approximate=True): the tanh GELU
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "use_cache": True,
        "dtype": "float32",
        EXPORT_KEY: provenance,
    }


def _is_previous_export(path: str) -> bool:
    """A directory that holds only what an export writes, with an exported config.json."""
    try:
        names = set(os.listdir(path))
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            exported = EXPORT_KEY in json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False
    return exported and names <= set(EXPORT_FILES)


def check_destination(dest: str) -> None:
    """export_dir may be absent, empty, or a previous export (replaced); anything else is refused."""
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        what = "it is a file or a link, not a directory"
    elif not os.listdir(dest) or _is_previous_export(dest):
        return
    else:
        foreign = sorted(set(os.listdir(dest)) - set(EXPORT_FILES))
        what = (f"it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which an export "
                "does not write" if foreign else f"its {CONFIG_FILE} was not written by --mode=export")
    raise UserError(
        f"--config.export_dir={dest} exists and is not a previous export ({what}), so --mode=export will not "
        "replace it: choose another --config.export_dir (an absent or empty directory), or move it away.")


def _write_aside(dest: str, hf_config: dict, tensors: dict[str, np.ndarray], meta_file: str | None) -> None:
    """Write the export into a hidden sibling directory, then rename it into place (replacing a previous one)."""
    from safetensors.numpy import save_file

    parent, name = os.path.split(os.path.abspath(dest))
    tmp, old = os.path.join(parent, f".tmp-{name}-{os.getpid()}"), os.path.join(parent, f".old-{name}-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(hf_config, indent=2) + "\n")
        # metadata format=pt: what save_pretrained writes, and what from_pretrained checks for
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        shutil.copymode(os.path.join(tmp, CONFIG_FILE), os.path.join(tmp, WEIGHTS_FILE))  # umask's, not 0600
        if meta_file:
            shutil.copyfile(meta_file, os.path.join(tmp, META_FILE))
        for file in os.listdir(tmp):
            with open(os.path.join(tmp, file), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if os.path.isdir(dest):  # a previous export or an empty directory (check_destination)
            os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except OSError:
            if os.path.isdir(old):  # put the previous export back
                os.rename(old, dest)
            raise
        fsync_dir(parent)
    except OSError as e:
        raise UserError(f"--mode=export could not write {dest} ({one_line(e)}): check that its parent "
                        "directory is writable and the disk has room, or choose another --config.export_dir.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
