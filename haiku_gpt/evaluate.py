"""Evaluation: nanoGPT's estimate_loss, and `--mode=eval` (the loss, or HellaSwag: hellaswag.py) on a
checkpoint or a pretrained GPT-2."""

from __future__ import annotations

import jax.numpy as jnp

from haiku_gpt import hellaswag, pretrained
from haiku_gpt.data import Dataset, batch_rng, sample_batch
from haiku_gpt.experiment import Experiment
from haiku_gpt.metrics import MetricsWriter
from haiku_gpt.steps import Steps


def estimate_loss(steps: Steps, params, dataset: Dataset, step: int) -> dict[str, float]:
    """Mean loss over eval_iters random batches of each split (nanoGPT's estimate_loss)."""
    cfg = steps.config
    out = {}
    for split, tokens in dataset.splits.items():
        rng = batch_rng(cfg.seed + 1, split, step)  # eval draws never disturb the training stream
        x, y = sample_batch(tokens, rng, (cfg.eval_iters, cfg.batch_size), cfg.block_size, rows=steps.local_rows())
        x, y = steps.shard_batch(x, y)
        out[split] = float(jnp.mean(steps.eval_losses(params, x, y)))
    return out


def model_params(exp: Experiment) -> tuple[object, int, bool]:
    """(params, step, pretrained): init_from's GPT-2 as it is (step 0), else out_dir's newest checkpoint."""
    if pretrained.is_pretrained(exp.config.init_from):
        return exp.pretrained_params(), 0, True
    state, meta = exp.restore()
    return state.params, int(meta["step"]), False


def evaluate_checkpoint(exp: Experiment) -> dict[str, float]:
    """--mode=eval: train/val loss (eval_task='loss') or HellaSwag's acc and acc_norm (eval_task='hellaswag')
    of out_dir's newest checkpoint or of init_from's GPT-2, printed, and recorded in out_dir's metrics.jsonl
    for a checkpoint (a pretrained model is not a run: nothing is written into out_dir)."""
    if exp.config.eval_task == "hellaswag":
        examples = hellaswag.load_examples(exp)  # bad input is refused before the weights load
        params, step, from_pretrained = model_params(exp)
        results = hellaswag.evaluate(exp, examples, params, step)
        record = {"step": step, **{f"hellaswag_{name}": value for name, value in results.items()}}
    else:
        params, step, from_pretrained = model_params(exp)
        results = estimate_loss(exp.steps, exp.steps.place_params(params), exp.dataset, step)
        exp.log(f"step {step}: train loss {results['train']:.4f}, val loss {results['val']:.4f}")
        record = {"step": step, "train_loss": results["train"], "val_loss": results["val"]}
    MetricsWriter(exp.config.out_dir, enabled=exp.is_main and not from_pretrained).write(record)
    return results
