"""--mode=export: a checkpoint as Hugging Face GPT-2, read back by init_from=DIR and by transformers.

Two runs of one optimizer step each (every parameter, biases included, moves off its init):
  bpe:  GPT-2's BPE (50257 tokens padded to 50304 rows), bias=False (tiny.py's): zero biases, unpadding.
  char: the character-level corpus, bias=True: the biases' names, the vocabulary in meta.json.
"""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file

from haiku_gpt.configs import tiny
from haiku_gpt import export, prepare
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import setup
from haiku_gpt.model import make_model
from haiku_gpt.train import train
from tests.conftest import corpus_text, quiet

N_LAYER, N_EMBD = 2, 32  # tiny.py's


def one_step_run(config, **fields):
    """Train `config` for one step (lr 1e-2, no warmup), export it; the Experiment, its params, the export."""
    config.update(max_iters=1, eval_interval=1, eval_iters=1, warmup_iters=0, decay_lr=False, learning_rate=1e-2,
                  tensorboard=False, keep_checkpoints=1, **fields)
    train(setup(config, quiet))
    exp = setup(config, quiet)
    dest = export.export_checkpoint(exp)
    state, _ = exp.restore()
    return exp, state.params, dest


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-bpe")
    prepare.prepare_text(corpus_text(6000), root / "data" / "bpe", "gpt2", source="tests")
    config = tiny.get_config()
    config.update(data_dir=str(root / "data"), dataset="bpe", out_dir=str(root / "out"))
    return one_step_run(config)


@pytest.fixture(scope="module")
def char(tmp_path_factory, data_dir):
    config = tiny.get_config()
    config.update(data_dir=data_dir, dataset="chars", out_dir=str(tmp_path_factory.mktemp("export-char") / "out"))
    return one_step_run(config, bias=True)


def read_export(dest):
    with open(os.path.join(dest, "config.json")) as f:
        return json.load(f), load_file(os.path.join(dest, "model.safetensors"))


def logits(model_config, params, idx):
    return np.asarray(make_model(model_config).apply(params, None, idx)[0])


def reimport(exp, dest):
    """--config.init_from=dest with the run's config: the model and weights haiku_gpt reads back."""
    config = copy.deepcopy(exp.config)
    config.init_from = dest
    again = setup(config, quiet)
    return again, again.pretrained_params()


def hf_names(n_layer):
    """GPT2LMHeadModel's parameter names, spelled out (not through pretrained.hf_key)."""
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names |= {f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"}
    return names


IDX = np.random.default_rng(0).integers(0, 50, (2, 16)).astype(np.int32)  # ids valid in both vocabularies


def test_bpe_export_is_gpt2_with_its_50257_tokens_and_zero_biases(bpe):
    exp, params, dest = bpe
    assert exp.vocab_size == 50304 and not exp.config.bias
    cfg, tensors = read_export(dest)
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == \
        (50257, 16, N_LAYER, 2, N_EMBD)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (50256, 50256, True)
    assert (cfg["activation_function"], cfg["layer_norm_epsilon"]) == ("gelu_new", 1e-5)
    assert cfg["haiku_gpt_export"] == {"out_dir": exp.config.out_dir, "step": 1, "dataset": "bpe", "tokenizer": "gpt2"}
    # every Linear and LayerNorm has its bias, zero for this bias-free model; the tied head is not written
    assert set(tensors) == hf_names(N_LAYER)
    biases = [k for k in tensors if k.endswith(".bias")]
    assert len(biases) == 6 * N_LAYER + 1 and all(not tensors[k].any() for k in biases)
    assert all(v.dtype == np.float32 for v in tensors.values())
    wte = np.asarray(params["gpt/wte"]["embeddings"])
    np.testing.assert_array_equal(tensors["transformer.wte.weight"], wte[:50257])
    np.testing.assert_array_equal(tensors["transformer.h.1.mlp.c_fc.weight"], params["gpt/h_1/mlp/c_fc"]["w"])
    with safetensors.safe_open(os.path.join(dest, "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}  # what from_pretrained checks for


def test_bpe_export_round_trips_through_init_from(bpe):
    exp, params, dest = bpe
    again, params_again = reimport(exp, dest)
    assert again.config.bias and again.vocab_size == 50257  # biases (zeros) and the real tokens only
    ours, theirs = logits(exp.model_config, params, IDX), logits(again.model_config, params_again, IDX)
    assert theirs.shape == (2, 16, 50257)
    np.testing.assert_allclose(theirs, ours[..., :50257], rtol=0, atol=1e-6 * np.abs(ours).max())


def test_char_export_carries_its_vocabulary_and_biases_and_round_trips(char):
    exp, params, dest = char
    cfg, tensors = read_export(dest)
    assert sorted(os.listdir(dest)) == ["config.json", "meta.json", "model.safetensors"]
    with open(os.path.join(exp.dataset.path, "meta.json"), "rb") as a, open(os.path.join(dest, "meta.json"), "rb") as b:
        assert a.read() == b.read()
    assert cfg["vocab_size"] == len(exp.dataset.meta["itos"]) == exp.vocab_size
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None  # no <|endoftext|> in a char vocabulary
    assert set(tensors) == hf_names(N_LAYER)
    init_params = jax.device_get(exp.steps.init(exp.config.seed).params)
    for module, name, key in [("gpt/h_0/attn/c_attn", "b", "h.0.attn.c_attn.bias"),
                              ("gpt/h_1/mlp/c_proj", "b", "h.1.mlp.c_proj.bias"),
                              ("gpt/h_1/ln_2", "offset", "h.1.ln_2.bias"), ("gpt/ln_f", "scale", "ln_f.weight")]:
        np.testing.assert_array_equal(tensors["transformer." + key], params[module][name])
        moved = np.asarray(params[module][name]) != np.asarray(init_params[module][name])
        if module.endswith("c_attn"):
            # The key third of the QKV bias adds one constant to a softmax row's scores: its gradient is zero in
            # exact arithmetic (rounding noise in floats), so only the query and value thirds must have moved.
            q, _, v = np.split(moved, 3)
            moved = np.concatenate([q, v])
        assert moved.all(), f"{module}/{name}: {np.sum(~moved)} values still at their init after a training step"
    again, params_again = reimport(exp, dest)
    np.testing.assert_array_equal(logits(again.model_config, params_again, IDX), logits(exp.model_config, params, IDX))


@pytest.mark.parametrize("run", ["bpe", "char"])
def test_transformers_loads_the_export_with_our_logits(run, request):
    pytest.importorskip("torch", reason="torch is not installed: transformers needs it to run GPT2LMHeadModel "
                                        "(pip install -e '.[hf]')")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed, so the export "
                                                              "cannot be loaded with it (pip install -e '.[hf]')")
    import torch

    exp, params, dest = request.getfixturevalue(run)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(dest, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    model.eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDX).long()).logits.numpy()
    ours = logits(exp.model_config, params, IDX)[..., :exp.valid_vocab]
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * np.abs(ours).max())


def with_export_dir(exp, dest):
    config = copy.deepcopy(exp.config)
    config.export_dir = str(dest)
    return dataclasses.replace(exp, config=config)


def snapshot(path):
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def stats(path):
    """The directory's and its files' inodes and modification times: what any write would change."""
    return [(p, s.st_ino, s.st_mtime_ns) for p in ["", *sorted(os.listdir(path))]
            for s in [os.stat(os.path.join(path, p))]]


def test_a_previous_export_is_replaced_whole_and_nothing_else_is(char, tmp_path, monkeypatch):
    exp = char[0]
    dest = tmp_path / "hf"
    dest.mkdir()  # an empty directory may be written into
    assert export.export_checkpoint(with_export_dir(exp, dest)) == str(dest)
    first, first_stats = snapshot(dest), stats(dest)
    assert export.export_checkpoint(with_export_dir(exp, dest)) == str(dest)  # a previous export: replaced
    assert snapshot(dest) == first and sorted(os.listdir(tmp_path)) == ["hf"]  # nothing left aside
    assert stats(dest)[0][1] != first_stats[0][1]  # a new directory, renamed into place
    first_stats = stats(dest)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("safetensors.numpy.save_file", disk_full)
    with pytest.raises(UserError, match=r"could not write .*No space left on device"):
        export.export_checkpoint(with_export_dir(exp, dest))
    assert stats(dest) == first_stats and sorted(os.listdir(tmp_path)) == ["hf"]  # the previous export untouched
    monkeypatch.undo()

    (dest / "tokenizer.json").write_text("{}")  # something a user added: not ours to delete
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for path, why in [(dest, "it holds tokenizer.json, which an export does not write"),
                      (other, "it holds notes.txt"), (blocker, "it is a file or a link")]:
        before = snapshot(path) if path.is_dir() else path.read_text()
        with pytest.raises(UserError, match=f"export_dir={path} exists and is not a previous export \\({why}"):
            export.export_checkpoint(with_export_dir(exp, path))
        assert (snapshot(path) if path.is_dir() else path.read_text()) == before


@pytest.mark.parametrize("meta", [{"tokenizer": "gpt2", "vocab_size": 1000},
                                  {"tokenizer": "cl100k", "vocab_size": 100277}], ids=["resized-bpe", "other-bpe"])
def test_a_tokenizer_without_a_gpt2_form_is_refused(char, tmp_path, meta):
    exp = char[0]
    exp = dataclasses.replace(with_export_dir(exp, tmp_path / "hf"),
                              dataset=dataclasses.replace(exp.dataset, meta=meta))
    with pytest.raises(UserError, match=f"with tokenizer '{meta['tokenizer']}' \\({meta['vocab_size']} tokens\\), "
                                        "which neither describes.*--tokenizer gpt2"):
        export.export_checkpoint(exp)
    assert not os.listdir(tmp_path)


def test_a_grouped_query_model_is_refused(char, tmp_path):
    """Hugging Face's GPT-2 has no grouped-query attention: refused before anything is read or written."""
    exp = with_export_dir(char[0], tmp_path / "hf")
    config = copy.deepcopy(exp.config)
    config.n_kv_head = 1
    with pytest.raises(UserError, match=r"--config.n_kv_head=1 key/value heads for n_head=2 \(grouped-query "
                                        r"attention\), so it has no GPT-2 form.*--config.n_kv_head=0 to export"):
        export.export_checkpoint(dataclasses.replace(exp, config=config))
    assert not os.listdir(tmp_path)
