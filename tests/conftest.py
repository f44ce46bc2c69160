"""Shared test fixtures: the shared data folder, seeds, thread limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Offline tiktoken and the named data sets come from ../shared/data when it is there.
if SHARED_DATA.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken-cache"))
    os.environ.setdefault("GPTLAB_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """GPTLAB_CACHE in a folder of this test session: what the tests download, prepare or measure
    (peak FLOP/s, decoding heads) stays out of the user's cache, and the user's does not steer them."""
    previous = os.environ.get("GPTLAB_CACHE")
    os.environ["GPTLAB_CACHE"] = str(tmp_path_factory.mktemp("gptlab-cache"))
    yield
    if previous is None:
        del os.environ["GPTLAB_CACHE"]
    else:
        os.environ["GPTLAB_CACHE"] = previous


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN for every fp32 product, however small, whatever this machine measured; the list of its calls."""
    from gptlab import machine

    if not machine._onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(machine, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(machine, "onednn_pays", lambda: True)
    calls = []
    apply = machine._OneDNNLinear.apply
    monkeypatch.setattr(machine._OneDNNLinear, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


def run_torchrun(args: list[str], cwd: Path, run_dir: Path, timeout: float = 300):
    """`torchrun --standalone --nproc-per-node 2 -m gptlab ARGS` in `cwd` with its own cache; the finished process.

    One retry, after clearing `run_dir`: torchrun's standalone rendezvous picks a free port and can lose it
    to another process before binding it (a failure of the machine, not of gptlab); a real bug fails twice.
    """
    import shutil
    import subprocess
    import sys

    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
               "-m", "gptlab", *args]  # fmt: skip
    env = {**os.environ, "GPTLAB_CACHE": str(cwd / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if done.returncode != 0:
        print(f"torchrun failed once (retrying):\n{done.stderr[-3000:]}")
        shutil.rmtree(run_dir, ignore_errors=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
