"""The top-level names `kernels` and `configs` are other packages' (Hugging Face's `kernels`, which
transformers imports): the repository's kernels/ and configs/ folders are `haiku_gpt.kernels` and
`haiku_gpt.configs`.

From the repository root (`python -c`, `python -m pytest`), the root is on sys.path ahead of
site-packages, so `import kernels` finds the folder. Its __init__.py then calls `gave_way`, which
loads the next package of that name on sys.path in the folder's place, or fails the import as if the
folder were not there. Standard library only: nothing heavy runs for another package's import.
"""

import importlib.machinery
import importlib.util
import os
import sys


def gave_way(name: str, init_file: str) -> bool:
    """True when a folder of this repository was imported as the top-level package `name`: the next
    package of that name outside the repository root now stands in sys.modules[name] (the import
    returns it). False when it was imported under its package name (`haiku_gpt.kernels`)."""
    if "." in name:
        return False
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    # Not this checkout, nor any other haiku_gpt checkout on sys.path (whose folder would give way back).
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root
            and not os.path.isfile(os.path.join(p or os.curdir, "haiku_gpt", "names.py"))]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the repository's {name}/ folder is haiku_gpt.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what the import statement returns once this __init__.py finishes
    spec.loader.exec_module(module)
    return True
