"""--config.document_mask: training windows split into their documents at <|endoftext|>.

A GPT-2 BPE dataset of many short documents is prepared as data/text/prepare.py prepares a .jsonl
corpus (each document followed by <|endoftext|>, 50256), and the tiny config trains on it.
"""

import copy
import json

import jax
import numpy as np
import pytest

from haiku_gpt import preflight, prepare
from haiku_gpt.corpus import files_corpus
from haiku_gpt.data import train_batches
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import setup
from haiku_gpt.model import document_segment_ids
from haiku_gpt.tokenizer import GPT2_END_OF_TEXT
from tests.conftest import corpus_text, quiet


@pytest.fixture(scope="module")
def documents_dir(tmp_path_factory):
    """data_dir holding 'docs': ~150 documents of 3 to 25 words in GPT-2's BPE."""
    root = tmp_path_factory.mktemp("documents")
    words = corpus_text(20_000).split()
    rng = np.random.default_rng(0)
    lines, start = [], 0
    while start < len(words):
        n = int(rng.integers(3, 26))
        lines.append(json.dumps({"text": " ".join(words[start:start + n])}))
        start += n
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    prepare.prepare_stream(files_corpus(root / "docs.jsonl"), root / "data" / "docs", "gpt2")
    return str(root / "data")


def test_the_dataset_has_its_documents_end_of_text(tiny_config, documents_dir):
    tiny_config.update(data_dir=documents_dir, dataset="docs", document_mask=True)
    exp = setup(tiny_config, quiet)
    tokens = np.asarray(exp.dataset.splits["train"])
    assert exp.dataset.meta["tokenizer"] == "gpt2" and exp.dataset.meta["documents"] > 100
    assert tokens[-1] == GPT2_END_OF_TEXT and 50 < np.sum(tokens == GPT2_END_OF_TEXT) < len(tokens) // 5


def test_a_train_step_with_document_mask_runs_and_masks(tiny_config, documents_dir):
    """Two optimizer steps with document_mask=True. Then, with those weights scaled up (peaked attention,
    where masking shows), the eval loss of windows crossing documents differs from the unmasked run's,
    and equals it on windows without end-of-text."""
    exps = {}
    for mask in (False, True):
        config = copy.deepcopy(tiny_config)  # the Experiment keeps its config (its steps are built on first use)
        config.update(data_dir=documents_dir, dataset="docs", document_mask=mask)
        exps[mask] = setup(config, quiet)
    x, y = train_batches(exps[True].dataset.splits["train"], tiny_config.seed, 0, 2, (1, tiny_config.batch_size),
                         tiny_config.block_size)
    assert (x == GPT2_END_OF_TEXT).any(axis=-1).mean() > 0.3  # many windows hold a document boundary
    state, metrics = exps[True].steps.train_steps(exps[True].steps.init(tiny_config.seed), x, y)
    assert np.isfinite(np.asarray(metrics["loss"])).all() and int(state.step) == 2
    big = jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, state.params)
    no_boundary = np.full((1, tiny_config.batch_size, tiny_config.block_size), 5, np.int32)
    crossing = {mask: float(exp.steps.eval_losses(big, x[0], y[0])[0]) for mask, exp in exps.items()}
    plain = {mask: float(exp.steps.eval_losses(big, no_boundary, no_boundary)[0]) for mask, exp in exps.items()}
    assert abs(crossing[True] - crossing[False]) > 1e-3 * crossing[False]
    assert plain[True] == pytest.approx(plain[False], rel=1e-6)


def test_segments_of_a_real_window_follow_its_end_of_text_tokens(tiny_config, documents_dir):
    tiny_config.update(data_dir=documents_dir, dataset="docs")
    exp = setup(tiny_config, quiet)
    x, _ = train_batches(exp.dataset.splits["train"], 0, 0, 1, (1, 8), 16)
    x = x[0, 0]
    ids = np.asarray(jax.jit(document_segment_ids, static_argnums=1)(x, GPT2_END_OF_TEXT))
    for row, seg in zip(x, ids):
        ends = np.flatnonzero(row == GPT2_END_OF_TEXT)
        expected = np.searchsorted(ends, np.arange(16), side="left")  # end-of-text tokens strictly before
        np.testing.assert_array_equal(seg, expected)


def test_document_mask_needs_a_dataset_with_an_end_of_text_token(tiny_config):
    tiny_config.document_mask = True  # tiny_config's dataset is character-level
    with pytest.raises(UserError, match=r"document_mask=True .* dataset 'chars' was prepared with the 'char' "
                                        r"tokenizer, which has no such token .*--tokenizer gpt2"):
        setup(tiny_config, quiet)


def test_preflight_traces_the_masked_step_with_its_shapes_checked(tiny_config, documents_dir):
    tiny_config.update(data_dir=documents_dir, dataset="docs", document_mask=True, n_kv_head=1)
    report = preflight.check_shapes(setup(tiny_config, quiet))
    assert "2 heads (1 key/value)" in report.model and "document mask" in report.model
