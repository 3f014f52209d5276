"""The import picture: every module imports only modules below it in `LAYERS`, never one above.

Data flows one way (config -> data -> model -> steps -> train -> checkpoints and metrics), and the
imports follow it. Imports inside functions count too. A new module must be given its place here.
"""

import ast
from pathlib import Path

from tests.conftest import REPO

# Bottom to top. A module may import any module listed before it, and nothing listed after it.
LAYERS = [
    "haiku_gpt.errors",         # UserError: the one exception a user sees as a paragraph
    "haiku_gpt.system",         # the machine: allocator, platforms, memory, compiler options
    "kernels.dropout",          # the attention-dropout hash
    "kernels.reference",        # einsum attention (and the cached decode form)
    "kernels.flash_attention",  # the Pallas kernel
    "kernels.attention",        # the dispatcher over attention_impl
    "kernels",
    "haiku_gpt.loss",           # the chunked lm_head + cross-entropy
    "haiku_gpt.model",          # GPT-2 as hk.Modules
    "haiku_gpt.costs",          # parameters, FLOPs, MFU, memory: from the shape alone
    "haiku_gpt.distributed",    # jax.distributed, the mesh and shardings
    "haiku_gpt.targets",        # compile-only GPU/TPU targets
    "haiku_gpt.config",         # config validation, the model shape from a config
    "configs.base",
    "configs.shakespeare_char",
    "configs.shakespeare_char_cpu",
    "configs.tiny",
    "configs.shakespeare",
    "configs.finetune_shakespeare",
    "configs.gpt2_124m",
    "configs.default",
    "configs",
    "haiku_gpt.optimizer",      # AdamW and the schedule
    "haiku_gpt.tokenizer",
    "haiku_gpt.data",           # the token files and batches
    "haiku_gpt.corpus",         # .txt/.jsonl/.parquet files and Hugging Face datasets as streams of documents
    "haiku_gpt.prepare",        # text -> token files
    "haiku_gpt.prepare_bench",  # peak memory and throughput of prepare on a generated corpus
    "haiku_gpt.metrics",        # metrics.jsonl, loss.png, the step log
    "haiku_gpt.checkpoint_npz", # the checkpoint format before orbax, read to convert it
    "haiku_gpt.checkpoint",     # orbax checkpoints, and restoring one into a run
    "haiku_gpt.pretrained",     # GPT-2 weights from Hugging Face
    "haiku_gpt.steps",          # the jitted init / train step / eval
    "haiku_gpt.experiment",     # setup(config): what every mode starts from
    "haiku_gpt.hellaswag",      # HellaSwag's acc and acc_norm
    "haiku_gpt.evaluate",       # estimate_loss, --mode=eval
    "haiku_gpt.sample",         # generation, --mode=sample
    "haiku_gpt.export",         # --mode=export: a checkpoint as Hugging Face GPT-2
    "haiku_gpt.shape_checks",   # jaxtyping checks for abstract traces
    "haiku_gpt.preflight",      # --mode=check and the check before training
    "haiku_gpt.train",          # the training loop
    "haiku_gpt.modes",          # what launch.py runs for each --mode
    "haiku_gpt.kernel_matrix",  # the compile matrix of the kernel
    "haiku_gpt.gpu_bench",      # --what=gpu: kernels, the train steps and nanoGPT on one GPU
    "haiku_gpt.bench",
    "haiku_gpt",
    "launch",
]
PACKAGES = ("haiku_gpt", "kernels", "configs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _project_modules() -> dict[str, Path]:
    files = [REPO / "launch.py", *(p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py"))]
    return {_module_name(p): p for p in files}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it (`from pkg import mod` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from pkg import mod` imports mod; `from mod import name` imports mod
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found & known


def test_every_module_has_a_layer():
    modules = _project_modules()
    assert sorted(set(modules) - set(LAYERS)) == []
    assert sorted(set(LAYERS) - set(modules)) == []


def test_no_import_runs_back_up():
    modules = _project_modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{name} imports {target}"
              for name, path in sorted(modules.items())
              for target in sorted(_imports(path, set(modules)))
              if target != name and rank[target] >= rank[name]]
    assert upward == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """A deliberate upward import, inside a function as the lazy imports are, is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from haiku_gpt import train\n    import kernels.attention\n")
    assert _imports(module, {"haiku_gpt.train", "kernels.attention", "haiku_gpt"}) == {
        "haiku_gpt.train", "kernels.attention"}
