"""gptlab: build GPT-style language models from scratch in PyTorch and take them through their whole life.

Imports are lazy so that `gptlab --help` starts fast; `from gptlab import GPT` still works.
"""

from gptlab.errors import GptlabError

__version__ = "0.1.0"

_LAZY = {
    "GPT": "gptlab.model",
    "KVCache": "gptlab.model",
    "GPTConfig": "gptlab.config",
    "get_preset": "gptlab.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")


__all__ = ["GptlabError", "__version__", *_LAZY]
