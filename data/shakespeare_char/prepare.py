"""Tiny Shakespeare, one token per character (nanoGPT's data/shakespeare_char).

    python data/shakespeare_char/prepare.py [--input PATH/to/input.txt] [--force]

Writes train.bin, val.bin and meta.json next to this file, downloading
input.txt first unless it is here already or --input names a local copy.
"""

import os
import sys

try:
    import haiku_gpt  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a plain checkout: the repo root is two folders up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from haiku_gpt.prepare import shakespeare_main

if __name__ == "__main__":
    sys.exit(shakespeare_main("char", default_out_dir=os.path.dirname(os.path.abspath(__file__))))
