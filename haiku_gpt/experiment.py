"""One run's set-up, shared by every mode (train, eval, sample, check) and built once.

  config -> validate -> the pretrained shape (init_from=gpt2*) -> dataset -> vocabulary -> jitted steps

`setup(config)` returns an `Experiment`; the modes take it from there (train.py, evaluate.py,
sample.py, preflight.py). Nothing is compiled or allocated here: JAX compiles on first call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import ml_collections

from haiku_gpt import checkpoint, distributed, pretrained
from haiku_gpt.config import model_config, padded_vocab_size, resolved, validate
from haiku_gpt.data import Dataset, open_dataset
from haiku_gpt.errors import UserError
from haiku_gpt.model import GPTConfig
from haiku_gpt.steps import Steps, TrainingState, make_steps
from haiku_gpt.tokenizer import Tokenizer, document_separator


@dataclasses.dataclass(frozen=True)
class Experiment:
    config: ml_collections.ConfigDict  # validated, with a pretrained checkpoint's shape where init_from names one
    dataset: Dataset | None  # None: no dataset was needed (a pretrained GPT-2 sampled as it is, a compile-only check)
    vocab_size: int  # embedding rows (BPE's 50257 padded to 50304)
    valid_vocab: int  # real tokens: the rows past it are never sampled
    tokenizer: Tokenizer | None  # None for a compile-only check without a dataset
    log: Callable[[str], None]  # print on process 0, silent on the others
    mesh: Any = None  # --config.target: its compile-only devices (preflight.target_mesh); None: this process's

    @property
    def model_config(self) -> GPTConfig:
        return model_config(self.config, self.vocab_size)

    @functools.cached_property
    def steps(self) -> Steps:
        """The jitted functions, built on first use: the preflight's analytic estimate refuses a run that
        cannot fit before anything (even the abstract init that lays out several devices) is traced."""
        return make_steps(self.config, self.vocab_size, self.mesh)

    @property
    def is_main(self) -> bool:
        return distributed.is_main_process()

    def run_meta(self, **extra) -> dict:
        """What this run's checkpoints record about it (and what a restored one must agree with)."""
        return checkpoint.run_meta(self.config, self.dataset, self.vocab_size, **extra)

    def restore(self) -> tuple[TrainingState, dict]:
        """out_dir's newest intact checkpoint, checked against this run's model and vocabulary."""
        return checkpoint.restore(self.config.out_dir, self.steps.restore_target(), self.run_meta(), self.log)

    def pretrained_params(self):
        """The weights of the GPT-2 checkpoint named by config.init_from, shaped for this model."""
        return pretrained.load_params(self.config.init_from, self.steps.abstract_state().params, self.log)


def check_document_mask(config: ml_collections.ConfigDict, dataset: Dataset) -> None:
    """--config.document_mask needs a dataset whose documents end in a token of their own: GPT-2's BPE."""
    if config.document_mask and document_separator(dataset.meta) is None:
        raise UserError(
            f"--config.document_mask=True splits each training window into its documents at the end-of-text "
            f"token the prepare scripts write after each document, but dataset {dataset.name!r} was prepared with "
            f"the {dataset.meta.get('tokenizer')!r} tokenizer, which has no such token (a character-level dataset "
            "separates documents with a newline, which is also ordinary text): drop --config.document_mask, or "
            "prepare the corpus with `--tokenizer gpt2` (data/text/prepare.py).")


def setup(config: ml_collections.ConfigDict, log: Callable[[str], None] = print, *,
          with_dataset: bool = True, mesh=None) -> Experiment:
    """Everything a mode needs from `config`; raises UserError for a config that cannot work.

    `with_dataset=False`: the vocabulary comes from the config (or the pretrained checkpoint)
    instead of a dataset. `mesh`: with --config.target, the target's compile-only devices, which
    `preflight.target_mesh(config)` resolves (the aot tools are not the trainer's to import).
    """
    validate(config, mesh)
    config = resolved(config, mesh)  # --config.dtype=auto: bfloat16 on a GPU/TPU, float32 on the CPU
    if not distributed.is_main_process():
        log = distributed.quiet_log
    config = pretrained.effective_config(config, log)  # init_from=gpt2*: the checkpoint's model shape
    dataset = open_dataset(config.data_dir, config.dataset, config.block_size) if with_dataset else None
    if dataset is not None:
        check_document_mask(config, dataset)
        vocab_size, valid_vocab, tokenizer = (padded_vocab_size(dataset.meta, config.vocab_size),
                                              dataset.vocab_size, dataset.tokenizer)
    elif pretrained.is_pretrained(config.init_from):
        tokenizer = pretrained.tokenizer_for(config)  # GPT-2's BPE, or the dataset's meta.json
        vocab_size, valid_vocab = config.vocab_size, min(tokenizer.vocab_size, config.vocab_size)
    else:
        vocab_size = valid_vocab = config.vocab_size
        tokenizer = None
    return Experiment(config, dataset, vocab_size, valid_vocab, tokenizer, log, mesh)
