"""Named public data sets and files: where they live, their checksums, and a resumable, verified download.

Files are looked up first in GPTLAB_DATA_DIR (a folder that already holds them), then in the cache
(GPTLAB_CACHE, default ~/.cache/gptlab), and downloaded into the cache only when missing.
"""

from __future__ import annotations

import os
from pathlib import Path

GPT2_FILES = ("encoder.json", "vocab.bpe")
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/124M"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


def data_dirs() -> list[Path]:
    """Folders searched for files before downloading: GPTLAB_DATA_DIR (if set), then the cache."""
    dirs = []
    if os.environ.get("GPTLAB_DATA_DIR"):
        dirs.append(Path(os.environ["GPTLAB_DATA_DIR"]))
    dirs.append(cache_dir())
    return dirs


def find_gpt2_files() -> tuple[Path, Path] | None:
    """(encoder.json, vocab.bpe) if both are present locally, else None."""
    for folder in data_dirs():
        paths = [folder / "gpt2" / name for name in GPT2_FILES]
        if all(p.is_file() for p in paths):
            return paths[0], paths[1]
    return None


def gpt2_files_help() -> str:
    where = cache_dir() / "gpt2"
    urls = ", ".join(f"{GPT2_BASE_URL}/{name}" for name in GPT2_FILES)
    return f"download {urls} into {where} (or set GPTLAB_DATA_DIR to a folder with a gpt2/ subfolder holding them)"
