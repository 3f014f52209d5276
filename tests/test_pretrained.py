"""init_from=<GPT-2 in Hugging Face's format>: loading, shape rules, finetuning, sampling; no network.

A small random checkpoint is written in Hugging Face's layout (config.json + model.safetensors with
wte/wpe/h.N.*/ln_f keys, Conv1D weights stored [in, out]) and its logits are compared with an
independent float64 numpy GPT-2.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from haiku_gpt import checkpoint, pretrained
from haiku_gpt.errors import UserError
from haiku_gpt.evaluate import evaluate_checkpoint
from haiku_gpt.experiment import setup
from haiku_gpt.model import make_model
from haiku_gpt.sample import sample_from_checkpoint
from haiku_gpt.train import train
from tests.conftest import REPO

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=100)


def hf_weights(n_layer, n_head, n_embd, n_positions, vocab_size, seed=0) -> dict[str, np.ndarray]:
    """Random GPT-2 weights under Hugging Face's names (float32), with its attention buffers."""
    rng = np.random.default_rng(seed)
    C = n_embd

    def normal(*shape, std=0.15):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"wte.weight": normal(vocab_size, C, std=0.5), "wpe.weight": normal(n_positions, C, std=0.5),
         "ln_f.weight": 1 + normal(C, std=0.1), "ln_f.bias": normal(C, std=0.1)}
    for i in range(n_layer):
        p = f"h.{i}."
        w |= {p + "ln_1.weight": 1 + normal(C, std=0.1), p + "ln_1.bias": normal(C, std=0.1),
              p + "attn.c_attn.weight": normal(C, 3 * C), p + "attn.c_attn.bias": normal(3 * C, std=0.1),
              p + "attn.c_proj.weight": normal(C, C), p + "attn.c_proj.bias": normal(C, std=0.1),
              p + "ln_2.weight": 1 + normal(C, std=0.1), p + "ln_2.bias": normal(C, std=0.1),
              p + "mlp.c_fc.weight": normal(C, 4 * C), p + "mlp.c_fc.bias": normal(4 * C, std=0.1),
              p + "mlp.c_proj.weight": normal(4 * C, C, std=0.08), p + "mlp.c_proj.bias": normal(C, std=0.1),
              # buffers Hugging Face files may carry: ignored by the loader
              p + "attn.bias": np.tril(np.ones((n_positions, n_positions), np.float32))[None, None],
              p + "attn.masked_bias": np.array(-1e4, np.float32)}
    return w


def write_checkpoint(path, weights, prefix="", **config_json):
    """config.json + model.safetensors in Hugging Face's GPT-2 layout."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5, **SHAPE)
    cfg["n_ctx"] = cfg["n_positions"]
    cfg.update(config_json)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({prefix + k: v for k, v in weights.items()}, str(path / "model.safetensors"))
    return str(path)


def numpy_gpt2(w: dict[str, np.ndarray], idx: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-2's forward pass in float64, written from the paper/HF definitions, for [B, T] ids."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n_layer = len({k.split(".")[1] for k in w if k.startswith("h.")})

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):  # Hugging Face's Conv1D: weight [in, out]
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):  # 'gelu_new'
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    out = []
    for row in idx:
        T = len(row)
        x = w["wte.weight"][row] + w["wpe.weight"][:T]
        C = x.shape[-1]
        D = C // n_head
        for i in range(n_layer):
            p = f"h.{i}."
            q, k, v = np.split(conv1d(layer_norm(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
            q, k, v = (a.reshape(T, n_head, D).transpose(1, 0, 2) for a in (q, k, v))
            att = q @ k.transpose(0, 2, 1) / np.sqrt(D)
            att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            y = (att @ v).transpose(1, 0, 2).reshape(T, C)
            x = x + conv1d(y, p + "attn.c_proj")
            x = x + conv1d(gelu(conv1d(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
        out.append(layer_norm(x, "ln_f") @ w["wte.weight"].T)
    return np.stack(out)


@pytest.fixture(scope="module")
def weights():
    return hf_weights(**SHAPE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, weights):
    return write_checkpoint(tmp_path_factory.mktemp("gpt2-synthetic"), weights)


def model_logits(config, idx):
    """Through the real path: setup (effective config) -> pretrained params -> model.apply."""
    exp = setup(config, lambda s: None, with_dataset=False)
    params = exp.pretrained_params()
    logits, _ = make_model(exp.model_config).apply(params, None, idx)
    return np.asarray(logits, np.float64), exp.config, params


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_logits_match_a_numpy_gpt2(tmp_path, tiny_config, weights, prefix):
    tiny_config.init_from = write_checkpoint(tmp_path / "ckpt", weights, prefix=prefix)
    tiny_config.block_size = 32
    idx = np.random.default_rng(1).integers(0, SHAPE["vocab_size"], (2, 32)).astype(np.int32)
    logits, cfg, _ = model_logits(tiny_config, idx)
    # the architecture fields come from config.json (tiny.py has 2 heads, 32 wide, no bias)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias, cfg.vocab_size) == (2, 4, 64, True, 100)
    assert logits.shape == (2, 32, 100)
    assert rel_err(logits, numpy_gpt2(weights, idx, SHAPE["n_head"])) <= 1e-5


def test_block_size_crops_the_position_table(tiny_config, ckpt, weights):
    tiny_config.init_from = ckpt
    tiny_config.block_size = 16
    idx = np.random.default_rng(2).integers(0, SHAPE["vocab_size"], (1, 16)).astype(np.int32)
    logits, cfg, params = model_logits(tiny_config, idx)
    assert params["gpt"]["wpe"].shape == (16, 64)
    np.testing.assert_array_equal(params["gpt"]["wpe"], weights["wpe.weight"][:16])
    assert rel_err(logits, numpy_gpt2(weights, idx, SHAPE["n_head"])) <= 1e-5

    tiny_config.block_size = 64
    with pytest.raises(UserError, match=r"block_size=64 is larger .*n_positions=32"):
        pretrained.effective_config(tiny_config, explicit=set())


def test_architecture_overrides_are_refused(tiny_config, ckpt):
    tiny_config.init_from = ckpt
    tiny_config.n_layer, tiny_config.bias = 3, False
    with pytest.raises(UserError) as e:
        pretrained.effective_config(tiny_config, explicit={"n_layer", "bias"})
    assert "n_layer (--config.n_layer=3, the checkpoint has 2)" in str(e.value)
    assert "bias (--config.bias=False, the checkpoint has True)" in str(e.value)
    # an explicit value equal to the checkpoint's is fine; dropout may change
    tiny_config.n_layer, tiny_config.n_embd, tiny_config.dropout = 2, 64, 0.1
    cfg = pretrained.effective_config(tiny_config, explicit={"n_layer", "n_embd", "dropout"})
    assert (cfg.n_layer, cfg.n_embd, cfg.bias, cfg.dropout) == (2, 64, True, 0.1)
    assert tiny_config.n_head == 2  # the caller's config is left alone


def test_grouped_query_attention_cannot_start_from_gpt2(tiny_config, ckpt):
    """GPT-2 has a key and a value head per query head: n_kv_head must be 0 or its n_head."""
    tiny_config.init_from = ckpt
    tiny_config.n_kv_head = 2
    with pytest.raises(UserError, match=r"GPT-2, which has as many key/value heads as query heads \(n_head=4.*"
                                        r"--config.n_kv_head=2 \(grouped-query attention\) cannot load it"):
        pretrained.effective_config(tiny_config, explicit=set())
    for fine in (0, 4):
        tiny_config.n_kv_head = fine
        assert pretrained.effective_config(tiny_config, explicit=set()).n_head == 4


def test_missing_files_give_clear_errors(tmp_path, tiny_config, weights):
    tiny_config.init_from = str(tmp_path)
    with pytest.raises(UserError, match=r"config\.json does not exist.*model\.safetensors"):
        pretrained.effective_config(tiny_config, explicit=set())
    write_checkpoint(tmp_path, weights)
    os.remove(tmp_path / "model.safetensors")
    exp = setup(tiny_config, lambda s: None, with_dataset=False)
    with pytest.raises(UserError, match=r"model\.safetensors does not exist"):
        exp.pretrained_params()
    tiny_config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"gpt2-xl, nor a directory"):
        setup(tiny_config)


@pytest.mark.parametrize("change, expected", [
    ("drop", r"has no tensor h\.1\.mlp\.c_fc\.bias, which the model needs"),
    ("shape", r"h\.0\.attn\.c_attn\.weight: the file has \(64, 190\), the model needs \(64, 192\)"),
    ("extra", r"tensors this GPT-2 does not use \(h\.2\.ln_1\.weight\)"),
])
def test_key_and_shape_mismatches_name_the_key(tmp_path, tiny_config, weights, change, expected):
    w = dict(weights)
    if change == "drop":
        del w["h.1.mlp.c_fc.bias"]
    elif change == "shape":
        w["h.0.attn.c_attn.weight"] = w["h.0.attn.c_attn.weight"][:, :190].copy()
    else:
        w["h.2.ln_1.weight"] = w["h.0.ln_1.weight"]
    tiny_config.init_from = write_checkpoint(tmp_path / "ckpt", w)
    exp = setup(tiny_config, lambda s: None, with_dataset=False)
    with pytest.raises(UserError, match=expected) as e:
        exp.pretrained_params()
    assert str(tmp_path / "ckpt" / "model.safetensors") in str(e.value)


def test_finetune_lowers_the_loss_then_resume_sample_and_eval(tiny_config, ckpt, capsys):
    tiny_config.init_from = ckpt
    tiny_config.update(check_attention=False, max_iters=12, eval_interval=12, learning_rate=3e-3,
                       warmup_iters=0, lr_decay_iters=12, log_interval=4, keep_checkpoints=1)
    logs = []
    summary = train(setup(tiny_config, logs.append))
    assert any("loaded" in line and "model.safetensors" in line for line in logs), logs
    evals = [json.loads(line) for line in open(os.path.join(tiny_config.out_dir, "metrics.jsonl"))
             if "val_loss" in line]
    assert [e["step"] for e in evals] == [0, 12]
    assert evals[1]["train_loss"] < evals[0]["train_loss"] - 0.5
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    meta = checkpoint.read_meta(os.path.join(tiny_config.out_dir, "checkpoints", "step_00000012"))
    assert meta["model"] == dict(n_layer=2, n_head=4, n_embd=64, n_kv_head=4, block_size=16, bias=True,
                                 vocab_size=100)  # n_kv_head resolved: GPT-2's key/value head per query head

    # resume with the same (tiny.py-shaped) config: the shape comes from the checkpoint's meta
    tiny_config.init_from, tiny_config.max_iters, tiny_config.always_save_checkpoint = "resume", 14, True
    logs = []
    assert train(setup(tiny_config, logs.append))["step"] == 14
    assert "resuming from step 12" in "\n".join(logs)
    # ... and again later: the resumed run's checkpoint still records where it started
    meta = checkpoint.read_meta(os.path.join(tiny_config.out_dir, "checkpoints", "step_00000014"))
    assert meta["config"]["init_from"] == "resume" and meta["pretrained_from"] == ckpt
    assert pretrained.effective_config(tiny_config, explicit=set()).n_embd == 64

    # sample straight from the pretrained directory: the dataset's char tokenizer (65 of 100 ids)
    tiny_config.init_from = ckpt
    texts = sample_from_checkpoint(setup(tiny_config, logs.append, with_dataset=False))  # an id >= 65 would raise
    assert len(texts) == 2 and all(len(t) == 1 + 20 for t in texts)
    assert "from pretrained" in logs[-1]
    # eval of the pretrained model itself writes nothing into out_dir
    before = open(os.path.join(tiny_config.out_dir, "metrics.jsonl")).read()
    losses = evaluate_checkpoint(setup(tiny_config, logs.append))
    assert abs(losses["val"] - evals[0]["val_loss"]) < 1e-4
    assert open(os.path.join(tiny_config.out_dir, "metrics.jsonl")).read() == before


def test_gpt2_offline_without_cache_is_a_clear_error(tmp_path, tiny_config, monkeypatch):
    pytest.importorskip("huggingface_hub")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_config.init_from = "gpt2"
    with pytest.raises(UserError) as e:
        pretrained.effective_config(tiny_config, explicit=set())
    message = str(e.value)
    assert "HF_HUB_OFFLINE" in message and "--config.init_from=/path/to/dir" in message
    assert str(tmp_path / "hf" / "hub") in message


def launch(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_launch_finetunes_from_a_pretrained_directory(tiny_config, ckpt):
    args = ["--config=configs/tiny.py", f"--config.init_from={ckpt}", f"--config.data_dir={tiny_config.data_dir}",
            "--config.dataset=chars", f"--config.out_dir={tiny_config.out_dir}", "--config.max_iters=3",
            "--config.eval_interval=3", "--config.check_attention=False"]
    result = launch(*args)
    assert result.returncode == 0, result.stderr
    assert "n_embd=64, bias=True, vocab_size=100 from its config.json" in result.stdout
    assert "step 3: train loss" in result.stdout
    refused = launch(*args, "--config.n_head=2")
    assert refused.returncode == 2
    assert "n_head (--config.n_head=2, the checkpoint has 4)" in refused.stderr
    assert "Traceback" not in refused.stderr
