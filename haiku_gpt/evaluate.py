"""Evaluation: nanoGPT's estimate_loss, and `--mode=eval` on a checkpoint or a pretrained GPT-2."""

from __future__ import annotations

import jax.numpy as jnp

from haiku_gpt import pretrained
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


def evaluate_checkpoint(exp: Experiment) -> dict[str, float]:
    """--mode=eval: train/val loss of out_dir's newest checkpoint (or of init_from's GPT-2), printed and recorded."""
    from_pretrained = pretrained.is_pretrained(exp.config.init_from)
    if from_pretrained:  # the pretrained model itself, not a run: nothing is recorded in out_dir
        params, step = exp.pretrained_params(), 0
    else:
        state, meta = exp.restore()
        params, step = state.params, int(meta["step"])
    losses = estimate_loss(exp.steps, exp.steps.place_params(params), exp.dataset, step)
    exp.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    record = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"]}
    MetricsWriter(exp.config.out_dir, enabled=exp.is_main and not from_pretrained).write(record)
    return losses
