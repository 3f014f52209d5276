"""HellaSwag (haiku_gpt/hellaswag.py): scores known in closed form, agreement with an independent float64
numpy GPT-2 scored one example at a time, --mode=eval on a pretrained directory and on a checkpoint, and
the errors for bad input. Every file is written by the tests in HellaSwag's format; no network.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haiku_gpt import hellaswag, modes, prepare
from haiku_gpt.config import validate
from haiku_gpt.errors import UserError
from haiku_gpt.evaluate import evaluate_checkpoint
from haiku_gpt.experiment import setup
from haiku_gpt.model import GPTConfig, make_model
from haiku_gpt.tokenizer import CharTokenizer, load_gpt2_encoding
from haiku_gpt.train import train
from tests.conftest import quiet
from tests.test_pretrained import hf_weights, numpy_gpt2, write_checkpoint


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(dict(ex, split="val")) + "\n" for ex in examples), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Known scores: a bigram model built by hand


def repeat_model(vocab: str, repeat_logit: float, block_size: int = 16):
    """A GPT whose next-token logits are `repeat_logit` for the current token and 0 for every other, at
    any position: the blocks add nothing (zero output projections), wpe is zero, and wte's rows are
    orthogonal with zero mean, so ln_f(wte[a]) . wte[b] is 0 unless a == b."""
    V = len(vocab)
    cfg = GPTConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=2 * V, bias=True)
    params = make_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, block_size), jnp.int32))
    params = jax.tree.map(jnp.zeros_like, params)
    wte = np.concatenate([np.eye(V), -np.eye(V)], axis=1)  # row a: +1 at a, -1 at V + a (mean 0, variance 1/V)
    scale = repeat_logit * np.sqrt(1 / V + 1e-5) / 2  # ln_f(wte[a]) . wte[a] = 2 * scale / sqrt(1/V + eps)
    params["gpt/wte"]["embeddings"] = jnp.asarray(wte, jnp.float32)
    params["gpt/ln_f"]["scale"] = jnp.full((2 * V,), scale, jnp.float32)
    return cfg, params


def test_known_scores_where_sum_and_mean_disagree(tmp_path):
    """Each ending token costs `same` nats after the same character, `diff` after another. The ending
    ' c' (2 diffs) has the lowest sum, ' cccccc' (2 diffs + 5 sames) the lowest mean: acc and acc_norm
    pick different endings, so three labelled examples give acc 1/3 and acc_norm 2/3."""
    vocab, s = " abc", 3.0
    cfg, params = repeat_model(vocab, s)
    diff = np.log(np.exp(s) + len(vocab) - 1)
    same = diff - s
    endings = ["c", "cccccc", "ca", "cab"]
    long_ctx = "ab" * 20  # 40 + 7 tokens > block_size + 1: cropped, and the bigram scores do not change
    examples = [dict(ctx="ab", endings=endings, label=1),  # sum picks 0, mean 1: acc_norm right
                dict(ctx=long_ctx, endings=endings, label=1),
                dict(ctx="ab", endings=[endings[i] for i in (1, 2, 0, 3)], label=2)]  # sum right, mean wrong
    rows = [hellaswag.render(ex, CharTokenizer(vocab), cfg.block_size)
            for ex in hellaswag.read_examples(write_jsonl(tmp_path / "hs.jsonl", examples))]
    assert [r.cropped for r in rows] == [False, True, False]
    sums, means = hellaswag.score(hellaswag.make_scorer(cfg, "float32", len(vocab)), params, rows,
                                  batch_size=2, block_size=cfg.block_size, show_progress=False)

    expected_sums = np.array([2 * diff, 2 * diff + 5 * same, 3 * diff, 4 * diff])
    expected_means = expected_sums / np.array([2, 7, 3, 4])
    np.testing.assert_allclose(sums[:2], [expected_sums] * 2, rtol=1e-5)
    np.testing.assert_allclose(means[:2], [expected_means] * 2, rtol=1e-5)
    np.testing.assert_allclose(sums[2], expected_sums[[1, 2, 0, 3]], rtol=1e-5)
    assert hellaswag.accuracy(sums, means, np.array([1, 1, 2])) == {"acc": 1 / 3, "acc_norm": 2 / 3}

    with pytest.raises(UserError, match=r"ending is 18 tokens long, more than block_size=16"):
        hellaswag.render(dict(ctx="a", endings=["b" * 17] * 4, label=0), CharTokenizer(vocab), 16)


# ---------------------------------------------------------------------------
# Against a float64 numpy GPT-2, one example at a time


SHAPE = dict(n_layer=2, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)  # GPT-2's BPE vocabulary
BLOCK = 32
EXAMPLES = [  # 5 examples in batches of two: the first two pad to 32 tokens, the last to 16; two are cropped
    dict(ctx="A man is sitting on a roof. He", label=3,
         endings=["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                  "is holding a rubik's cube.", "starts pulling up roofing on a roof."]),
    dict(ctx="A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath. She",
         label=2, endings=["rinses the bucket off with soap and blow dry the dog's head.", "uses a hose to keep it "
                           "from getting soapy.", "gets the dog wet, then it runs away again.", "gets into a bath "
                           "tub with the dog."]),
    dict(ctx="Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
             "clothes smiles. Then", label=1,
         endings=[", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two "
                  "men supporting the head of the person wearing winter clothes snow as the we girls sled.",
                  ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing "
                  "the snow on his car."]),
    dict(ctx="Two bare-chested men are wrestling. They", label=0,
         endings=["grab each other and roll on the floor.", "sing.", "are eating noodles.", "fly away."]),
    dict(ctx="A cat", label=1, endings=["meows.", "sleeps in the sun all afternoon long.", "is a dog.", "runs."]),
]


def numpy_scores(weights, examples, n_head, block_size, valid_vocab=None):
    """build-nanogpt's loop, one unpadded row at a time, with rows cropped to their last block_size + 1."""
    enc = load_gpt2_encoding()
    sums, means = np.zeros((len(examples), 4)), np.zeros((len(examples), 4))
    for i, ex in enumerate(examples):
        ctx = enc.encode_ordinary(ex["ctx"])
        for j, ending in enumerate(ex["endings"]):
            end = enc.encode_ordinary(" " + ending)
            row = np.array(ctx + end)[-(block_size + 1):]
            logits = weights(row[None, :-1])[0][:, :valid_vocab]  # position t predicts row[t + 1]
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            losses = -logp[np.arange(len(row) - 1), row[1:]][-len(end):]
            sums[i, j], means[i, j] = losses.sum(), losses.mean()
    return sums, means


def spy_on_score(monkeypatch) -> list:
    """The (sums, means) of every hellaswag.score call, appended as they come."""
    scored, real_score = [], hellaswag.score
    monkeypatch.setattr(hellaswag, "score", lambda *a, **k: scored.append(real_score(*a, **k)) or scored[-1])
    return scored


def test_pretrained_eval_matches_numpy_gpt2_without_a_dataset(tmp_path, tiny_config, monkeypatch, capsys):
    weights = hf_weights(**SHAPE)
    tiny_config.update(init_from=write_checkpoint(tmp_path / "gpt2", weights, **SHAPE), block_size=BLOCK,
                       eval_task="hellaswag", hellaswag_path=str(write_jsonl(tmp_path / "val.jsonl", EXAMPLES)),
                       data_dir=str(tmp_path / "no-data"), batch_size=2)
    scored = spy_on_score(monkeypatch)
    assert not modes.needs_dataset("eval", tiny_config)
    assert modes.run("eval", tiny_config) == 0  # no dataset in data_dir: none is read

    sums, means = scored[0]
    expected_sums, expected_means = numpy_scores(lambda idx: numpy_gpt2(weights, idx, SHAPE["n_head"]), EXAMPLES,
                                                 SHAPE["n_head"], BLOCK)
    np.testing.assert_allclose(sums, expected_sums, rtol=1e-5)
    np.testing.assert_allclose(means, expected_means, rtol=1e-5)
    labels = np.array([ex["label"] for ex in EXAMPLES])
    acc = np.mean(expected_sums.argmin(1) == labels)
    acc_norm = np.mean(expected_means.argmin(1) == labels)
    out = capsys.readouterr().out
    assert f"step 0: hellaswag acc {acc:.4f} (summed log-probability), acc_norm {acc_norm:.4f}" in out
    assert "2 of 5 examples are longer than block_size + 1 = 33 tokens" in out  # the second and third
    assert not os.path.exists(os.path.join(tiny_config.out_dir, "metrics.jsonl"))  # a pretrained model: no run

    tiny_config.hellaswag_limit = 2  # the first two examples only
    assert [len(ex.rows) for ex in hellaswag.load_examples(setup(tiny_config, quiet, with_dataset=False))] == [4, 4]


# ---------------------------------------------------------------------------
# A trained checkpoint: padded vocabulary, metrics.jsonl


def hf_names(params) -> dict[str, np.ndarray]:
    """Haiku's parameters under Hugging Face's GPT-2 names, for numpy_gpt2 (zero biases for bias=False)."""
    out = {}
    for module, tensors in params.items():  # e.g. 'gpt/h_0/attn/c_attn': {'w', 'b'} -> h.0.attn.c_attn.weight
        for name, value in tensors.items():
            path = "wpe" if name == "wpe" else module.removeprefix("gpt/").replace("h_", "h.").replace("/", ".")
            out[path + (".bias" if name in ("b", "offset") else ".weight")] = np.asarray(value)
    for key in [k for k in out if k not in ("wte.weight", "wpe.weight")]:
        out.setdefault(key.removesuffix("weight") + "bias", np.zeros(out[key].shape[-1], np.float32))
    return out


@pytest.fixture(scope="module")
def bpe_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-data")
    text = " ".join(ex["ctx"] + " " + " ".join(ex["endings"]) for ex in EXAMPLES) * 20
    prepare.prepare_text(text, root / "bpe", "gpt2", source="tests")
    return str(root)


def test_checkpoint_eval_is_recorded_with_its_step(tmp_path, tiny_config, bpe_data_dir, monkeypatch):
    tiny_config.update(data_dir=bpe_data_dir, dataset="bpe", n_layer=1, block_size=BLOCK, batch_size=2, max_iters=2,
                       eval_interval=2, eval_iters=1, always_save_checkpoint=True, tensorboard=False,
                       eval_task="hellaswag",
                       hellaswag_path=str(write_jsonl(tmp_path / "val.jsonl", EXAMPLES)))
    train(setup(tiny_config, quiet))
    exp = setup(tiny_config, quiet)
    assert (exp.vocab_size, exp.valid_vocab) == (50304, 50257)  # the padding rows are no tokens
    scored = spy_on_score(monkeypatch)
    results = evaluate_checkpoint(exp)

    weights = hf_names(exp.restore()[0].params)
    sums, means = numpy_scores(lambda idx: numpy_gpt2(weights, idx, tiny_config.n_head), EXAMPLES,
                               tiny_config.n_head, BLOCK, valid_vocab=exp.valid_vocab)
    np.testing.assert_allclose(scored[0][0], sums, rtol=1e-5)  # the softmax is over the 50257 real tokens
    np.testing.assert_allclose(scored[0][1], means, rtol=1e-5)
    labels = np.array([ex["label"] for ex in EXAMPLES])
    assert results == {"acc": np.mean(sums.argmin(1) == labels), "acc_norm": np.mean(means.argmin(1) == labels),
                       "n": 5, "cropped": 2}
    with open(os.path.join(tiny_config.out_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    assert record == {"step": 2, "hellaswag_acc": results["acc"], "hellaswag_acc_norm": results["acc_norm"],
                      "hellaswag_n": 5, "hellaswag_cropped": 2}


# ---------------------------------------------------------------------------
# Bad input


def test_a_char_level_model_is_refused_before_anything_loads(tiny_config):
    tiny_config.eval_task = "hellaswag"  # tiny's dataset is character-level; out_dir holds no checkpoint
    with pytest.raises(UserError, match=r"GPT-2 BPE tokens, and this model has the char tokenizer.*"
                                        r"--tokenizer gpt2.*--config.init_from=gpt2"):
        evaluate_checkpoint(setup(tiny_config, quiet))


def test_file_errors_name_the_fix(tmp_path, tiny_config, monkeypatch):
    tiny_config.data_dir = str(tmp_path / "data")
    cached = tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "VAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    with pytest.raises(UserError, match=r"not cached at .*could not be downloaded.*no internet\? Copy "
                                        r"hellaswag_val.jsonl to .*--config.hellaswag_path=") as e:
        hellaswag.local_file(tiny_config)
    assert str(cached) in str(e.value) and "Shakespeare" not in str(e.value)
    cached.parent.mkdir(parents=True)
    write_jsonl(cached, EXAMPLES)
    assert hellaswag.local_file(tiny_config) == cached  # cached: no download
    assert len(hellaswag.read_examples(cached, limit=3)) == 3

    tiny_config.hellaswag_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"hellaswag_path=.*missing.jsonl is not a file"):
        hellaswag.local_file(tiny_config)
    for bad, problem in [(dict(ctx="x", endings=["a"] * 4), "no 'label' field"),
                         (dict(ctx="x", endings=["a"] * 3, label=0), "'endings' is not a list of 4 texts"),
                         (dict(ctx="x", endings=["a"] * 4, label=4), "'label' is 4, not an integer from 0 to 3")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], bad])
        with pytest.raises(UserError, match=rf"bad.jsonl, line 2: {problem}\. A HellaSwag file"):
            hellaswag.read_examples(path)
    tiny_config.eval_task = "hellaswg"
    with pytest.raises(UserError, match=r"eval_task='hellaswg' is not one of loss, hellaswag"):
        validate(tiny_config)
