"""The config files (`--config=configs/<name>.py`), imported as `haiku_gpt.configs` (the repository keeps
them in its top-level configs/ folder; see haiku_gpt/__init__.py)."""

from haiku_gpt.names import gave_way

gave_way(__name__, __file__)  # imported as the top-level `configs`: another package's name (haiku_gpt/names.py)
