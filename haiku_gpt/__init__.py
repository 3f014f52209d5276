"""haiku_gpt: a small, exact, fast GPT trainer in JAX and Haiku.

The repository keeps the attention kernels and the config files in its top-level folders `kernels/`
and `configs/` (`--config=configs/shakespeare_char.py`), but they are imported, and installed, as
`haiku_gpt.kernels` and `haiku_gpt.configs`: the generic top-level names belong to other packages
(Hugging Face's `kernels`, which transformers imports). An installed wheel holds them inside the
package (pyproject.toml's package-dir), and an editable install maps them through setuptools' finder;
in a plain checkout (`python launch.py`, pytest from the repository root) `_alias_checkout_folders`
below maps exactly those two names to the folders beside this package, and nothing else of the
repository becomes part of it.
"""

import importlib.abc
import importlib.util
import os
import sys

_CHECKOUT_FOLDERS = {"kernels": "kernels", "configs": "configs"}  # haiku_gpt.<name> -> <repository>/<folder>


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds `haiku_gpt.kernels` and `haiku_gpt.configs` (those names only) in a source checkout's folders."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders  # full module name -> the package's folder

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None  # their submodules are found through the package's __path__ as usual
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def _alias_checkout_folders() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return  # not a source checkout (an installed wheel holds haiku_gpt/kernels, haiku_gpt/configs)
    folders = {}
    for name, folder in _CHECKOUT_FOLDERS.items():
        inside = os.path.join(here, name)
        outside = os.path.join(root, folder)
        if not os.path.isdir(inside) and os.path.isfile(os.path.join(outside, "__init__.py")):
            folders[f"{__name__}.{name}"] = outside
    if folders and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFolders(folders))


_alias_checkout_folders()
