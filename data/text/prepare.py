"""Your own text as a dataset: a UTF-8 file, or a folder of .txt files (joined in name order).

    python data/text/prepare.py --input FILE_OR_DIR [--tokenizer char|gpt2] [--name NAME] [--force]

Writes train.bin, val.bin and meta.json to data/NAME/ (NAME defaults to the
input's name); then train with --config.dataset=NAME.
"""

import os
import sys

try:
    import haiku_gpt  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a plain checkout: the repo root is two folders up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from haiku_gpt.prepare import text_main

if __name__ == "__main__":
    # Datasets live beside this script's folder: data/NAME/.
    sys.exit(text_main(data_root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
