"""HellaSwag (`--mode=eval --config.eval_task=hellaswag`), scored as build-nanogpt and llm.c score it.

Each HellaSwag example is a context and four endings, one of them right (`label`). The model reads
each ending as a completion of the context, in GPT-2 BPE tokens:

  row     = tokens(ctx) + tokens(" " + ending)          (the space joins them as in running text)
  loss_i  = -log p(token_i | the tokens before it)        for each of the ending's tokens only
  sum     = sum of loss_i over the ending                 -> acc:      argmin over the four == label
  mean    = sum / number of the ending's tokens           -> acc_norm: argmin over the four == label

This is build-nanogpt's hellaswag.py exactly (llm.c's dev/data/hellaswag.py is the same): its `acc`
ranks endings by the summed loss, its `acc_norm` by the loss averaged over the ending's tokens, and a
tie goes to the first ending, as torch's argmin does. On the 10,042 validation examples it reports
GPT-2 124M at acc 0.2859, acc_norm 0.2955 (GPT-2 XL: 0.3842, 0.4893). EleutherAI's
lm-evaluation-harness poses the task differently (a preprocessed context, acc_norm normalised by the
ending's length in bytes): its 0.2892 / 0.3114 for GPT-2 124M are not comparable.

Two things build-nanogpt never meets, because GPT-2's 1024 positions hold every example:
- a row longer than block_size + 1 tokens keeps its last block_size + 1: the context is cropped
  from the left, so the model sees at most block_size tokens before each token it predicts (the
  last token is only a target). Cropped examples are counted and reported.
- a model trained with a padded vocabulary (BPE's 50257 padded to 50304) has its padding logits
  left out of the softmax, as sampling does: the probabilities are over real tokens.

Batched and jitted: `batch_size` examples (4 rows each) per call, padded on the right (causal
attention: padding never reaches a real position) to the smallest power of two that holds the
batch's longest row, at least 16 and at most block_size; the last batch is filled with empty
examples. The scorer compiles once per length bucket, a few times for the whole set.

Only GPT-2 BPE models are scored: a char-level model is refused (see `check_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int
from tqdm import tqdm

from haiku_gpt import prepare
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import Experiment
from haiku_gpt.model import GPTConfig, make_model, mask_padding
from haiku_gpt.steps import make_logits_fn
from haiku_gpt.tokenizer import Tokenizer, one_line

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_FILE = os.path.join("hellaswag", "hellaswag_val.jsonl")  # under config.data_dir
ENDINGS = 4
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Example:
    """One example as token rows: context + ending, cropped to at most block_size + 1 tokens."""

    rows: tuple[np.ndarray, ...]  # ENDINGS int32 rows
    starts: tuple[int, ...]  # where each row's ending begins (>= 1: a context token precedes it)
    label: int
    cropped: bool  # some row lost context tokens to the crop


# ---------------------------------------------------------------------------
# The file


def local_file(config) -> Path:
    """--config.hellaswag_path, else data_dir/hellaswag/hellaswag_val.jsonl (downloaded once)."""
    if config.hellaswag_path:
        path = Path(os.path.expanduser(config.hellaswag_path))
        if not path.is_file():
            raise UserError(f"--config.hellaswag_path={config.hellaswag_path} is not a file: pass the path of "
                            f"HellaSwag's hellaswag_val.jsonl ({VAL_URL}), or leave it empty to download it once "
                            f"into {os.path.join(config.data_dir, CACHE_FILE)}.")
        return path
    path = Path(config.data_dir) / CACHE_FILE
    if not path.is_file():
        try:
            prepare.download(VAL_URL, path)
        except UserError as e:  # its message is about tiny Shakespeare: say what to do here
            raise UserError(
                f"HellaSwag's validation set is not cached at {path} and could not be downloaded from {VAL_URL} "
                f"({one_line(e.__cause__ or e)}): no internet? Copy hellaswag_val.jsonl to {path}, or pass "
                f"--config.hellaswag_path=PATH/to/hellaswag_val.jsonl.") from e
    return path


def read_examples(path: Path, limit: int = 0) -> list[dict]:
    """The examples of a HellaSwag jsonl file (ctx, endings, label), the first `limit` when limit > 0."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                example = e
            problem = _example_problem(example)
            if problem:
                raise UserError(f"{path}, line {number}: {problem}. A HellaSwag file holds one JSON object per line "
                                f"with 'ctx' (text), 'endings' ({ENDINGS} texts) and 'label' (0-{ENDINGS - 1}), as "
                                f"{VAL_URL} does: pass such a file with --config.hellaswag_path.")
            examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples: pass HellaSwag's hellaswag_val.jsonl with "
                        f"--config.hellaswag_path (or leave it empty to download it).")
    return examples


def _example_problem(example) -> str | None:
    if isinstance(example, json.JSONDecodeError):
        return f"not JSON ({one_line(example)})"
    if not isinstance(example, dict):
        return "not a JSON object"
    missing = [k for k in ("ctx", "endings", "label") if k not in example]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} field"
    endings, label = example["endings"], example["label"]
    if not isinstance(example["ctx"], str) or not example["ctx"].strip():
        return "'ctx' is not a non-empty text"
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
        return f"'endings' is not a list of {ENDINGS} texts"
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < ENDINGS):
        return f"'label' is {label!r}, not an integer from 0 to {ENDINGS - 1}"
    return None


# ---------------------------------------------------------------------------
# Tokens


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """Refuse what is not a GPT-2 BPE model, saying why."""
    if tokenizer.name == "gpt2":
        return
    raise UserError(
        f"HellaSwag is scored in GPT-2 BPE tokens, and this model has the {tokenizer.name} tokenizer: a "
        "character-level vocabulary, made from its training text, does not hold every character of HellaSwag's "
        "text, and acc_norm averaged over characters is not comparable with the published numbers (which average "
        "over BPE tokens). "
        "Evaluate a model trained on a dataset prepared with --tokenizer gpt2 (e.g. --config.dataset=shakespeare), "
        "or a pretrained GPT-2 (--config.init_from=gpt2).")


def render(example: dict, tokenizer: Tokenizer, block_size: int) -> Example:
    """The four rows of `example` (build-nanogpt's render_example), cropped from the left to block_size + 1."""
    context = tokenizer.encode(example["ctx"])
    rows, starts, cropped = [], [], False
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        if len(end) > block_size:
            raise UserError(
                f"a HellaSwag ending is {len(end)} tokens long, more than block_size={block_size} (the model must see "
                f"a context token before it): use a larger --config.block_size (GPT-2's is 1024). The ending: "
                f"{ending[:80]!r}")
        row = context + end
        keep = min(len(row), block_size + 1)
        cropped |= keep < len(row)
        rows.append(np.asarray(row[len(row) - keep:], np.int32))
        starts.append(keep - len(end))
    return Example(tuple(rows), tuple(starts), int(example["label"]), cropped)


def bucket_length(n: int, block_size: int) -> int:
    """The padded length for inputs of up to n tokens: a power of two, at least MIN_BUCKET, at most block_size."""
    return min(block_size, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def batch_arrays(examples: list[Example], batch_size: int, block_size: int):
    """(inputs, targets, mask) [batch_size * 4, T]: each row's tokens but the last, its tokens but the
    first, and where the targets are the ending's tokens; rows past the examples are empty (mask 0)."""
    length = bucket_length(max(len(row) - 1 for ex in examples for row in ex.rows), block_size)
    shape = (batch_size * ENDINGS, length)
    inputs, targets, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    for i, example in enumerate(examples):
        for j, (row, start) in enumerate(zip(example.rows, example.starts)):
            r, n = i * ENDINGS + j, len(row) - 1
            inputs[r, :n], targets[r, :n] = row[:-1], row[1:]
            mask[r, start - 1:n] = True  # target t is row[t + 1]: the ending's tokens from start on
    return inputs, targets, mask


# ---------------------------------------------------------------------------
# Scoring


def make_scorer(model_config: GPTConfig, dtype: str, valid_vocab: int) -> Callable:
    """A jitted (params, inputs, targets, mask) -> (summed, mean) loss of each row's masked targets."""
    logits_fn = make_logits_fn(make_model(dataclasses.replace(model_config, dropout=0.0, check_attention=False)),
                               dtype)

    @jax.jit
    def score_rows(params: hk.Params, inputs: Int[Array, "R T"], targets: Int[Array, "R T"],
                   mask: Bool[Array, "R T"]) -> tuple[Float[Array, " R"], Float[Array, " R"]]:
        logits = mask_padding(logits_fn(params, None, inputs, False), valid_vocab)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        summed = jnp.sum(jnp.where(mask, losses, 0.0), axis=-1)
        return summed, summed / jnp.maximum(jnp.sum(mask, axis=-1), 1)

    return score_rows


def score(scorer: Callable, params, examples: list[Example], batch_size: int, block_size: int,
          show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed and mean loss of every ending, each [len(examples), 4]."""
    sums, means = [], []
    with tqdm(total=len(examples), unit="example", desc="hellaswag", disable=None if show_progress else True,
              leave=False) as bar:
        for first in range(0, len(examples), batch_size):
            batch = examples[first:first + batch_size]
            summed, mean = scorer(params, *batch_arrays(batch, batch_size, block_size))
            sums.append(np.asarray(summed).reshape(batch_size, ENDINGS)[:len(batch)])
            means.append(np.asarray(mean).reshape(batch_size, ENDINGS)[:len(batch)])
            bar.update(len(batch))
    return np.concatenate(sums), np.concatenate(means)


def accuracy(sums: np.ndarray, means: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """acc: the lowest summed loss is the label's; acc_norm: the lowest mean loss is (first wins a tie)."""
    return {"acc": float(np.mean(np.argmin(sums, axis=1) == labels)),
            "acc_norm": float(np.mean(np.argmin(means, axis=1) == labels))}


# ---------------------------------------------------------------------------
# --mode=eval --config.eval_task=hellaswag


def load_examples(exp: Experiment) -> list[Example]:
    """The examples to score, as token rows; bad input (tokenizer, file, block_size) is refused here."""
    if jax.process_count() > 1:
        raise UserError("HellaSwag evaluation runs in one process: run --mode=eval on one host (one process "
                        "uses all of its devices).")
    check_tokenizer(exp.tokenizer)
    config = exp.config
    path = local_file(config)
    examples = read_examples(path, config.hellaswag_limit)
    exp.log(f"hellaswag: {len(examples):,} examples from {path}")
    return [render(example, exp.tokenizer, config.block_size) for example in examples]


def evaluate(exp: Experiment, examples: list[Example], params, step: int) -> dict[str, float]:
    """Score `examples` with `params`: acc, acc_norm, n and cropped, printed."""
    config = exp.config
    scorer = make_scorer(exp.model_config, config.dtype, exp.valid_vocab)
    sums, means = score(scorer, params, examples, config.batch_size, config.block_size, exp.is_main)
    results = {**accuracy(sums, means, np.array([ex.label for ex in examples])),
               "n": len(examples), "cropped": sum(ex.cropped for ex in examples)}
    if results["cropped"]:
        exp.log(f"hellaswag: {results['cropped']:,} of {len(examples):,} examples are longer than block_size + 1 = "
                f"{config.block_size + 1} tokens and had their context cropped from the left (a larger "
                "--config.block_size, up to the model's, scores them whole)")
    exp.log(f"step {step}: hellaswag acc {results['acc']:.4f} (summed log-probability), acc_norm "
            f"{results['acc_norm']:.4f} (mean per ending token), {len(examples):,} examples")
    return results
