"""Tiny Shakespeare with GPT-2's BPE tokenizer (nanoGPT's data/shakespeare).

    python data/shakespeare/prepare.py [--input PATH/to/input.txt] [--force]

Writes train.bin, val.bin and meta.json next to this file, downloading
input.txt first unless it is here already or --input names a local copy.
Offline, tiktoken needs TIKTOKEN_CACHE_DIR pointing at its cached BPE files.
"""

import os
import sys

try:
    import haiku_gpt  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a plain checkout: the repo root is two folders up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from haiku_gpt.prepare import shakespeare_main

if __name__ == "__main__":
    sys.exit(shakespeare_main("gpt2", default_out_dir=os.path.dirname(os.path.abspath(__file__))))
