"""Your own corpus as a dataset: .txt, .jsonl or .parquet files, a folder of them, or a Hugging Face dataset.

    python data/text/prepare.py --input FILE_OR_DIR [--tokenizer char|gpt2] [--name NAME] [--field text]
                                [--val_fraction 0.1] [--workers N] [--force]
    python data/text/prepare.py --hf_dataset NAME [--hf_config CONFIG] [--hf_split train] --tokenizer gpt2 ...

Streams the documents (a .txt file, a .jsonl line, a parquet or dataset row each), tokenizes
them in --workers processes and writes train.bin, val.bin and meta.json to data/NAME/ (NAME
defaults to the input's name); then train with --config.dataset=NAME. See haiku_gpt/prepare.py.
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
