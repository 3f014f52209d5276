"""The import picture: every module imports only modules below it in `LAYERS`, never one above.

Data flows one way (config -> data -> model -> steps -> train -> checkpoints and metrics), and the
imports follow it. Imports inside functions count too. A new module must be given its place here.
"""

import ast
from pathlib import Path

from tests.conftest import REPO

# Bottom to top. A module may import any module listed before it, and nothing listed after it.
LAYERS = [
    "haiku_gpt.names",          # the top-level names kernels/configs left to other packages
    "haiku_gpt.errors",         # UserError: the one exception a user sees as a paragraph
    "haiku_gpt.system",         # the machine: allocator, platforms, memory, compiler options
    "haiku_gpt.kernels.dropout",          # the attention-dropout hash
    "haiku_gpt.kernels.reference",        # einsum attention (and the cached decode form)
    "haiku_gpt.kernels.families",         # the pallas kernel's families and what each can run
    "haiku_gpt.kernels.mosaic_gpu_interpret",  # JAX's Mosaic GPU interpreter, with a fix to its wgmma
    "haiku_gpt.kernels.flash_attention_mgpu",  # the kernel's Hopper family (Pallas Mosaic GPU)
    "haiku_gpt.kernels.flash_attention",  # the Pallas kernel
    "haiku_gpt.kernels.attention",        # the dispatcher over attention_impl
    "haiku_gpt.kernels",
    "haiku_gpt.loss",           # the chunked lm_head + cross-entropy
    "haiku_gpt.model",          # GPT-2 as hk.Modules
    "haiku_gpt.costs",          # parameters, FLOPs, MFU, memory: from the shape alone
    "haiku_gpt.distributed",    # jax.distributed, the mesh and shardings
    "haiku_gpt.config",         # config validation, the model shape from a config
    "haiku_gpt.configs.base",
    "haiku_gpt.configs.shakespeare_char",
    "haiku_gpt.configs.shakespeare_char_cpu",
    "haiku_gpt.configs.tiny",
    "haiku_gpt.configs.shakespeare",
    "haiku_gpt.configs.finetune_shakespeare",
    "haiku_gpt.configs.gpt2_124m",
    "haiku_gpt.configs.default",
    "haiku_gpt.configs",
    "haiku_gpt.optimizer",      # AdamW and the schedule
    "haiku_gpt.tokenizer",
    "haiku_gpt.data",           # the token files and batches
    "haiku_gpt.corpus",         # .txt/.jsonl/.parquet files and Hugging Face datasets as streams of documents
    "haiku_gpt.prepare",        # text -> token files
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
    "haiku_gpt.aot.targets",    # compile-only GPU/TPU targets (a tool: only the preflight, below, uses it)
    "haiku_gpt.aot",
    "haiku_gpt.preflight",      # --mode=check and the check before training; resolves --config.target
    "haiku_gpt.train",          # the training loop
    "haiku_gpt.modes",          # what launch.py runs for each --mode
    "haiku_gpt.aot.kernel_matrix",  # the compile matrix of the kernel
    "haiku_gpt.benchmarks.prepare_bench",  # peak memory and throughput of prepare on a generated corpus
    "haiku_gpt.benchmarks.gpu_bench",  # --what=gpu: kernels, the train steps and nanoGPT on one GPU
    "haiku_gpt.benchmarks.cpu_bench",  # --what=cpu: GEMM rates, XLA:CPU options, a traced step
    "haiku_gpt.benchmarks.bench",
    "haiku_gpt.benchmarks",
    "haiku_gpt",
    "launch",
]
# Package name -> its folder in the repository (pyproject.toml's package-dir: kernels/ and configs/ are
# installed as haiku_gpt.kernels and haiku_gpt.configs).
PACKAGES = {"haiku_gpt": "haiku_gpt", "haiku_gpt.aot": "haiku_gpt/aot", "haiku_gpt.benchmarks": "haiku_gpt/benchmarks",
            "haiku_gpt.kernels": "kernels", "haiku_gpt.configs": "configs"}


def _module_name(package: str, path: Path) -> str:
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _project_modules() -> dict[str, Path]:
    modules = {"launch": REPO / "launch.py"}
    for package, folder in PACKAGES.items():
        modules.update({_module_name(package, p): p for p in (REPO / folder).glob("*.py")})
    return modules


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
    module.write_text("def f():\n    from haiku_gpt import train\n    import haiku_gpt.kernels.attention\n")
    assert _imports(module, {"haiku_gpt.train", "haiku_gpt.kernels.attention", "haiku_gpt"}) == {
        "haiku_gpt.train", "haiku_gpt.kernels.attention"}


def _imported_names(path: Path) -> set[str]:
    """Every absolute module name `path` imports (`from a.b import c` counts a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_kernels_and_configs_are_imported_by_their_package_names():
    """No module imports the repository's kernels/ or configs/ as the top-level `kernels` or `configs`:
    those names belong to other packages (Hugging Face's `kernels`, which transformers imports)."""
    files = {**_project_modules(), **{f"tests.{p.stem}": p for p in (REPO / "tests").glob("*.py")},
             **{f"data.{p.parent.name}.prepare": p for p in (REPO / "data").glob("*/prepare.py")}}
    top_level = [f"{name} imports {imported}" for name, path in sorted(files.items())
                 for imported in sorted(_imported_names(path)) if imported.split(".")[0] in ("kernels", "configs")]
    assert top_level == []


def test_the_trainer_imports_no_tool():
    """The compile-only targets (haiku_gpt.aot) and the benchmarks are tools beside the trainer: no module of the
    trainer imports them; the preflight (--mode=check) alone resolves --config.target and hands setup its mesh."""
    modules = _project_modules()
    tools = {m for m in modules if m.startswith(("haiku_gpt.aot", "haiku_gpt.benchmarks"))}
    users = {m: sorted(_imports(path, set(modules)) & tools) for m, path in modules.items()
             if m not in tools and m != "haiku_gpt.preflight"}
    assert {m: t for m, t in users.items() if t} == {}
