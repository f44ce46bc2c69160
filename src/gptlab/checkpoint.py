"""Run directories and checkpoints: safetensors weights, atomic writes, `latest` and `best`, loading a run.

A run directory holds:
    config.yaml        the full run config (task, model, data, train, ...)
    tokenizer/         the tokenizer the model was trained with
    checkpoints/step-0000100/
        model.safetensors   weights (a tied LM head is stored once, as the token embedding)
        state.safetensors   optimizer moments and RNG states (tensors only: nothing is unpickled)
        state.json          step, data position, scheduler, optimizer hyper-parameters, metrics
    latest, best       one line each: the name of a complete checkpoint folder
    metrics.jsonl, loss.png

Every file is written to a temporary name, fsynced and renamed, so a killed process never leaves a
half-written `latest`: the previous checkpoint stays valid until the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import GptlabError

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"


# ---------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ordinary_permissions(path: Path, directory: bool = False) -> None:
    """Give a file or folder made by `tempfile` (private: 0600, 0700) the permissions an ordinary `open` or
    `mkdir` would, under the user's umask, so that others may read runs as they may read other files."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if directory else 0o666) & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        ordinary_permissions(Path(tmp))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------- weights


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the LM head when it is the token embedding (safetensors refuses shared storage)."""
    head, embedding = state.get("lm_head.weight"), state.get("token_embedding.weight")
    if head is not None and embedding is not None and head.data_ptr() == embedding.data_ptr():
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def weights_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in _dedup_tied(state).items()}
    return save(state, metadata=metadata)


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, weights_bytes(state, metadata))


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a missing or damaged file is a one-line error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"weights file {path} not found")
    try:
        return load_file(os.fspath(path), device=str(device))
    except Exception as exc:
        raise GptlabError(
            f"weights file {path} is damaged or not safetensors ({str(exc).splitlines()[0]}){_earlier_hint(path.parent)}"
        ) from None


def _earlier_hint(folder: Path) -> str:
    """For a damaged checkpoint folder of a run, how to go back to the one before it."""
    if folder.parent.name != CHECKPOINTS:
        return ""
    earlier = [name for name in _step_folders(folder.parent.parent) if name < folder.name]
    if not earlier:
        return ""
    return f"; to go back to the checkpoint before it, write {earlier[-1]} into {folder.parent.parent / 'latest'}"


def _step_folders(run_dir: Path) -> list[str]:
    root = run_dir / CHECKPOINTS
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load weights saved by `save_weights`, restoring a tied head that was stored once."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    if tied and "lm_head.weight" not in state and "token_embedding.weight" in state:  # (LoRA adapters hold neither)
        state = {**state, "lm_head.weight": state["token_embedding.weight"]}
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise GptlabError(
                f"the weights do not fit the model ({name} is {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(own[name].shape)} in the model); is this checkpoint from another model?"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise GptlabError(f"the weights do not fit the model ({what}); is this checkpoint from another model?")


# ---------------------------------------------------------------- trainer state


def flatten_state(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into tensors (by dotted path) and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {
                "__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(node.items())]
            }
        if isinstance(node, (list, tuple)):
            kind = "__tuple__" if isinstance(node, tuple) else "__list__"
            return {kind: [walk(v, f"{path}.{i}") for i, v in enumerate(node)]}
        return node

    return tensors, walk(tree, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(tensors, v) for v in skeleton["__tuple__"])
        if "__list__" in skeleton:
            return [unflatten_state(tensors, v) for v in skeleton["__list__"]]
    return skeleton


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int = 2,
    best: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint folder, then point `latest` (and `best`) at it; prune old ones.

    The folder is assembled under a temporary name and renamed only when every file is on disk;
    `extra` adds more to it first (an FSDP run's sharded optimizer state).
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    ordinary_permissions(tmp, directory=True)
    try:
        from safetensors.torch import save

        tensors, skeleton = flatten_state(trainer_state, "state")
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights_bytes(model_state))
        atomic_write_bytes(tmp / STATE_TENSORS_FILE, save(tensors))
        atomic_write_text(tmp / STATE_FILE, json.dumps(skeleton))
        if extra is not None:
            extra(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptlabError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); the previous checkpoint is intact"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    if best:
        atomic_write_text(run_dir / "best", final.name + "\n")
    _prune(run_dir, keep)
    return final


def _pointer(run_dir: Path, name: str) -> Path | None:
    """The checkpoint folder a `latest` or `best` file names, None without one (or naming a folder that is
    gone). It may name only one of the run's own step folders: anything else (a path elsewhere, garbage)
    is a damaged file, said in one line with the way to repair it."""
    pointer = run_dir / name
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_text().strip()
    except UnicodeDecodeError:
        text = ""
    if not re.fullmatch(r"step-\d+", text):
        steps = _step_folders(run_dir)
        fix = f"write {steps[-1]} (or another of {', '.join(steps)}) into it" if steps else "delete it"
        raise GptlabError(f"{pointer} is damaged: it should name one of the run's checkpoint folders; {fix}")
    target = run_dir / CHECKPOINTS / text
    return target if target.is_dir() else None


def _prune(run_dir: Path, keep: int) -> None:
    root = run_dir / CHECKPOINTS
    protected = {p for p in (_pointer(run_dir, "latest"), _pointer(run_dir, "best")) if p is not None}
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[: max(0, len(steps) - max(keep, 1))]:
        if old not in protected:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*"):  # temporary folders of a killed write
        shutil.rmtree(leftover, ignore_errors=True)


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint folder for a run directory (its `latest` or `best`) or a checkpoint folder itself."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    if not path.exists():
        raise GptlabError(f"{path} does not exist; give a run directory or a checkpoint folder")
    target = _pointer(path, which) or _pointer(path, "latest")
    if target is None:
        pointers = f"'{which}' or 'latest'" if which != "latest" else "'latest'"
        if _step_folders(path):
            raise GptlabError(
                f"{path} has no {pointers} file naming one of its checkpoints ({', '.join(_step_folders(path))}); "
                f"write the one to use into {path / 'latest'}"
            )
        raise GptlabError(f"{path} holds no checkpoint (no {pointers} file); train or import a model first")
    return target


def load_trainer_state(checkpoint: Path, require: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's trainer state (step, optimizer, data position, RNG, ...); one that lacks what `require`
    names (a resume needs the optimizer's) or cannot be read is damaged, said in one line."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(checkpoint / STATE_TENSORS_FILE))
        skeleton = json.loads((checkpoint / STATE_FILE).read_text())
        state = unflatten_state(tensors, skeleton)
        missing = [key for key in require if key not in state]
        if missing:
            raise ValueError(f"its state lacks {', '.join(missing)}")
    except Exception as exc:
        raise GptlabError(
            f"checkpoint {checkpoint} is damaged ({str(exc).splitlines()[0]}){_earlier_hint(checkpoint)}"
        ) from None
    return state


# ---------------------------------------------------------------- runs


def check_folder_path(folder: str | Path, what: str) -> None:
    """Refuse a folder path that is, or lies inside, something other than a folder (a file, say)."""
    path = Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise GptlabError(f"{what} {folder}: {existing} is a file, not a folder")


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory that holds a checkpoint folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint


# ---------------------------------------------------------------- one writer per run

LOCK_FILE = ".lock"  # in the run directory: holds the pid of the command writing the run
_HELD_LOCKS: dict[Path, int] = {}  # run directory -> the descriptor this process locks it with


def lock_run(run_dir: Path) -> None:
    """Take the run directory's lock (an advisory `flock`, creating the directory), or refuse with one line:
    two commands writing one run would mix their checkpoints and metrics. The operating system drops the
    lock with the process, so a killed run leaves none behind. Taking a lock this process holds is a no-op."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return
    key = Path(run_dir).resolve()
    if key in _HELD_LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise GptlabError(
            f"{run_dir} is being written by another gptlab command (process {holder}); wait for it to end or stop it"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _HELD_LOCKS[key] = descriptor


def unlock_run(run_dir: Path) -> None:
    """Let go of a lock `lock_run` took (nothing if this process holds none on `run_dir`)."""
    descriptor = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the descriptor drops its flock


def run_files(run_dir: Path) -> list[Path]:
    """What a run directory holds besides its lock file."""
    return [path for path in run_dir.iterdir() if path.name != LOCK_FILE] if run_dir.is_dir() else []


def check_resumable(run_dir: str | Path) -> None:
    """Refuse to resume what holds no run: a wrong path, or a run stopped before it wrote anything (while
    it prepared its data or scored DPO's reference, say)."""
    if not (Path(run_dir) / CONFIG_FILE).is_file():
        raise GptlabError(
            f"{run_dir} holds no run to resume (no {CONFIG_FILE}: the path is wrong, or the run stopped before "
            "it began); start it without --resume"
        )


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    from gptlab.config import load_config_file

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise GptlabError(f"{run_dir} is not a gptlab run (no {CONFIG_FILE})")
    try:
        values = load_config_file(path)
    except UnicodeDecodeError:
        values = None
    if not isinstance(values, dict) or not isinstance(values.get("model"), dict):
        # Every run's config has its model: without it nothing can be rebuilt, resumed or exported.
        raise GptlabError(
            f"{path} is damaged (it holds no model section); restore it, or rerun the run with --overwrite"
        )
    return values


def write_run_config(run_dir: str | Path, values: dict[str, Any]) -> None:
    from gptlab.config import dump_yaml

    atomic_write_text(Path(run_dir) / CONFIG_FILE, dump_yaml(values))


@dataclass
class LoadedRun:
    """A trained model ready to use: the model (eval mode), its tokenizer and its run config."""

    model: torch.nn.Module
    tokenizer: Any
    config: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    extras: dict[str, Any] = field(default_factory=dict)


def build_model(run_config: dict[str, Any]) -> torch.nn.Module:
    """The model a run config describes (a GPT, with the task's head)."""
    from gptlab.config import GPTConfig, config_from_dict
    from gptlab.model import GPT

    model_config = config_from_dict(GPTConfig, run_config["model"], where="model.")
    if run_config.get("task") == "classify":
        from gptlab.classify import build_classifier

        model = build_classifier(model_config, run_config)
    else:
        model = GPT(model_config)
    if run_config.get("lora"):
        from gptlab.config import LoRAConfig
        from gptlab.lora import apply_lora

        apply_lora(model, config_from_dict(LoRAConfig, run_config["lora"], where="lora."))
    return model


def checkpoint_weights(checkpoint: Path, run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights. A LoRA run stores only its adapters: they are laid over the weights
    of its base checkpoint, the run's `init_from` (absolute, or relative to the working directory)."""
    weights = load_weights(checkpoint / WEIGHTS_FILE)
    if not run_config.get("lora"):
        return weights
    if not run_config.get("init_from"):
        raise GptlabError(f"LoRA run {run_dir_of(checkpoint)} names no base run (init_from in {CONFIG_FILE})")
    if not Path(run_config["init_from"]).exists():
        raise GptlabError(
            f"LoRA run {run_dir_of(checkpoint)} needs its base run {run_config['init_from']}, which does not exist; "
            "restore it, or keep LoRA runs as merged runs (gptlab lora merge)"
        )
    base = find_checkpoint(run_config["init_from"])
    if read_run_config(run_dir_of(base)).get("lora"):
        raise GptlabError(f"base run {base} is itself a LoRA run; merge it first with `gptlab lora merge`")
    return {**load_weights(base / WEIGHTS_FILE), **weights}


def load_run(path: str | Path, device: str | torch.device = "cpu", which: str = "latest") -> LoadedRun:
    """Load a run directory or checkpoint folder: model weights, tokenizer and config."""
    from gptlab.tokenizer import load_tokenizer

    checkpoint = find_checkpoint(path, which)
    run_dir = run_dir_of(checkpoint)
    config = read_run_config(run_dir)
    model = build_model(config)
    load_model_state(model, checkpoint_weights(checkpoint, config))
    model.to(device).eval()
    return LoadedRun(model, load_tokenizer(run_dir / "tokenizer"), config, run_dir, checkpoint)
