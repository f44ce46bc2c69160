"""Corpora to token shards on disk, and the samplers that batch them for training.

`prepare_corpus` reads a source (a text file, a folder, JSON lines, a named data set or the embedded
default), holds out the tail of the corpus for validation (whole documents where it has several),
tokenizes it in chunks in parallel processes with bounded memory and writes `train.bin` / `val.bin`
(uint16 when the vocabulary fits, else uint32) and `meta.json`. Shards are memory mapped, so a corpus
larger than memory trains as easily as a small one. torch is imported only where batches are made,
so `gptlab prepare` and the tokenizing processes start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizer import (
    EOT,
    KINDS,
    SAFE_BREAK,
    Tokenizer,
    build_tokenizer,
    check_bpe_vocab_size,
    load_tokenizer,
)

if TYPE_CHECKING:
    from torch import Tensor

    from gptlab.config import DataConfig

FORMAT_VERSION = 2  # 2: byte counts are of the text tokenized (JSON lines: without the JSON)
CHUNK_BYTES = 4 << 20  # text per tokenizing task: bounds each process's memory
SEARCH_BYTES = 1 << 16  # how far past a chunk's end to look for a safe break
META_FILE = "meta.json"
SHARDS = ("train", "val")
_SAFE_BREAK = re.compile(SAFE_BREAK.encode())
_SPACE_BREAK = re.compile(rb"(?<=[!-~])(?= [!-~])")


# ---------------------------------------------------------------- sources


def embedded_default_text() -> str:
    """The corpus every Python install carries: CPython's documentation topics (about 460 KB of English),
    one document per topic, separated by `<|endoftext|>`."""
    return EOT.join(_embedded_documents())


def _embedded_documents() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise GptlabError(
            "this Python has no pydoc_data module for the embedded default corpus; pass a text file or a data set name"
        ) from None
    return [topics[name].strip() + "\n" for name in sorted(topics)]


@dataclass(frozen=True)
class _Unit:
    """A source file, or an inline document (the embedded default): a run of bytes holding documents."""

    name: str  # for messages: the full path
    label: str  # for the checksum: the name within the source, so a moved corpus is still recognised
    size: int
    path: Path | None = None
    text: str | None = None
    jsonl: bool = False  # one JSON object with a "text" field per line, each line a document

    def read(self, start: int, end: int) -> bytes:
        if self.text is not None:
            return self.text.encode()[start:end]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def _resolve_source(source: str) -> tuple[str, list[_Unit]]:
    """A description of the source and its units, in corpus order."""
    from gptlab.download import DATASETS, dataset_path, get_dataset

    if not source:
        docs = _embedded_documents()
        return "embedded default (pydoc_data.topics)", [
            _Unit(f"pydoc_data.topics[{i}]", f"topic {i}", len(d.encode()), text=d) for i, d in enumerate(docs)
        ]
    path = Path(source).expanduser()
    if path.is_dir():
        names = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
        visible = [name for name in names if not any(part.startswith(".") for part in name.parts)]
        units = [_file_unit(path / name, name.as_posix()) for name in visible if (path / name).stat().st_size > 0]
        if not units:
            raise GptlabError(f"folder {path} holds no non-empty files to read")
        return f"folder {path}", units
    if path.is_file():
        if path.stat().st_size == 0:
            raise GptlabError(f"{path} is empty; give a file with text in it")
        return f"file {path}", [_file_unit(path, path.name)]
    if path.exists():
        raise GptlabError(f"{source!r} is neither a file nor a folder (a device or a pipe, say); give a text file")
    try:
        dataset = get_dataset(source)
    except GptlabError as exc:
        raise GptlabError(f"no file or folder {source!r}, and {exc}") from None
    if dataset.use != "corpus":
        corpora = ", ".join(name for name, d in DATASETS.items() if d.use == "corpus")
        raise GptlabError(f"data set {source!r} ({dataset.description}) is not a corpus to pretrain on; use {corpora}")
    return f"data set {source}", [_file_unit(dataset_path(source), source)]


def _file_unit(path: Path, label: str) -> _Unit:
    return _Unit(str(path), label, path.stat().st_size, path=path, jsonl=path.suffix == ".jsonl")


def _source_sha256(units: list[_Unit]) -> tuple[str, list[dict[str, Any]]]:
    """The combined checksum of all units, and each file's own (for the metadata)."""
    from gptlab.download import file_sha256

    combined = hashlib.sha256()
    files = []
    for unit in units:
        digest = file_sha256(unit.path) if unit.path else hashlib.sha256(unit.text.encode()).hexdigest()
        combined.update(f"{unit.label}\0{digest}\n".encode())
        if unit.path:
            files.append({"path": unit.name, "bytes": unit.size, "sha256": digest})
    return combined.hexdigest(), files


# ---------------------------------------------------------------- planning: split and chunks


@dataclass(frozen=True)
class _Piece:
    """A byte range of one unit: whole JSON lines, or a stretch of a text document cut at safe breaks."""

    unit: _Unit
    start: int
    end: int

    @property
    def ends_document(self) -> bool:
        return self.end == self.unit.size


def _safe_break(unit: _Unit, position: int) -> int:
    """The first position at or after `position` where cutting the text changes no token (else the next
    character boundary), or the unit's end."""
    if position >= unit.size:
        return unit.size
    window = unit.read(position, min(unit.size, position + SEARCH_BYTES))
    for pattern in (_SAFE_BREAK, _SPACE_BREAK):
        found = pattern.search(window)
        if found:
            return position + found.start()
    offset = 0
    while offset < len(window) and 0x80 <= window[offset] < 0xC0:  # UTF-8 continuation bytes
        offset += 1
    return position + offset


def _line_start(unit: _Unit, position: int, forward: bool) -> int:
    """The start of the JSON line after (`forward`) or holding `position`."""
    if forward:
        while position < unit.size:
            block = unit.read(position, min(unit.size, position + SEARCH_BYTES))
            newline = block.find(b"\n")
            if newline >= 0:
                return position + newline + 1
            position += len(block)
        return unit.size
    end = position
    while end > 0:
        start = max(0, end - SEARCH_BYTES)
        newline = unit.read(start, end).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _split_point(units: list[_Unit], val_fraction: float) -> tuple[int, str]:
    """Where validation starts in the corpus's bytes, and how the cut was made ("documents" or "tail").

    The tail of the corpus is held out: at the document boundary nearest to the target share when one
    is close (between half and twice the share), else inside the last text document."""
    total = sum(u.size for u in units)
    target = min(round(total * (1 - val_fraction)), total - 1)
    offset = 0
    for unit in units:
        if offset + unit.size > target:
            break
        offset += unit.size
    candidates = [offset, offset + unit.size]
    if unit.jsonl:
        candidates += [offset + _line_start(unit, target - offset, f) for f in (False, True)]
    candidates = [c for c in candidates if 0 < c < total]
    if candidates:
        cut = min(candidates, key=lambda c: abs(c - target))
        share = (total - cut) / total
        if unit.jsonl or val_fraction / 2 <= share <= 2 * val_fraction:
            return cut, "documents"
    if unit.jsonl:
        raise GptlabError(f"{unit.name} has a single JSON line: add documents to hold some out for validation")
    cut = offset + _safe_break(unit, target - offset)
    if not 0 < cut < total:
        raise GptlabError(f"the corpus ({total} bytes) is too short to hold out {val_fraction:.0%} for validation")
    return cut, "tail"


def _pieces(units: list[_Unit], lo: int, hi: int, chunk_bytes: int) -> Iterator[_Piece]:
    """The pieces covering corpus bytes [lo, hi), each at most about `chunk_bytes`."""
    offset = 0
    for unit in units:
        start, end = max(lo - offset, 0), min(hi - offset, unit.size)
        offset += unit.size
        while start < end:
            if end - start <= chunk_bytes:
                cut = end
            elif unit.jsonl:
                cut = min(end, _line_start(unit, start + chunk_bytes, forward=True))
            else:
                cut = min(end, _safe_break(unit, start + chunk_bytes))
            yield _Piece(unit, start, cut)
            start = cut


def _tasks(pieces: Iterator[_Piece], chunk_bytes: int) -> Iterator[list[_Piece]]:
    """Consecutive pieces grouped into tasks of about `chunk_bytes` (many small files share a task)."""
    task, size = [], 0
    for piece in pieces:
        if task and size + piece.end - piece.start > chunk_bytes:
            yield task
            task, size = [], 0
        task.append(piece)
        size += piece.end - piece.start
    if task:
        yield task


# ---------------------------------------------------------------- reading and tokenizing


def _piece_texts(piece: _Piece, encoding_errors: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) for each document or stretch of one in `piece`."""
    data = piece.unit.read(piece.start, piece.end)
    if not piece.unit.jsonl:
        yield _decode(data, piece, 0, encoding_errors), piece.ends_document
        return
    offset = 0
    for line in data.split(b"\n"):
        if line.strip():
            yield _json_text(line, piece, offset, encoding_errors), True
        offset += len(line) + 1


def _decode(data: bytes, piece: _Piece, offset: int, encoding_errors: str) -> str:
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        where = piece.start + offset + exc.start
        raise GptlabError(
            f"{piece.unit.name}: invalid UTF-8 at byte {where} (line {_line_number(piece.unit, where)}); "
            "fix the file, or substitute U+FFFD (--data.encoding_errors replace; gptlab prepare: --encoding-errors "
            "replace)"
        ) from None


def _json_text(line: bytes, piece: _Piece, offset: int, encoding_errors: str) -> str:
    where = f"{piece.unit.name} line {_line_number(piece.unit, piece.start + offset)}"
    try:
        record = json.loads(_decode(line, piece, offset, encoding_errors))
    except json.JSONDecodeError as exc:
        raise GptlabError(
            f"{where}: not valid JSON ({exc.msg}); each line must be an object with a text field"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise GptlabError(f'{where}: no "text" field; each line must be a JSON object like {{"text": "..."}}')
    return record["text"]


def _line_number(unit: _Unit, position: int) -> int:
    return unit.read(0, position).count(b"\n") + 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _tokenize_task(task: list[_Piece], tokenizer: Tokenizer, encoding_errors: str) -> tuple[np.ndarray, int]:
    """The task's token ids and the UTF-8 bytes of the text they encode (the basis of bits per byte)."""
    ids: list[int] = []
    text_bytes = 0
    for text, ends_document in (t for piece in task for t in _piece_texts(piece, encoding_errors)):
        ids.extend(tokenizer.encode(text))
        text_bytes += len(text.encode("utf-8", errors="surrogatepass"))
        if ends_document:
            ids.append(tokenizer.eot_id)
    return np.array(ids, dtype=token_dtype(tokenizer.vocab_size)), text_bytes


_worker_args: tuple[Tokenizer, str] | None = None


def _init_worker(tokenizer: Tokenizer, encoding_errors: str) -> None:
    global _worker_args
    _worker_args = (tokenizer, encoding_errors)


def _tokenize_in_worker(task: list[_Piece]) -> tuple[np.ndarray, int]:
    return _tokenize_task(task, *_worker_args)


def _tokenized(
    tasks: list[list[_Piece]], tokenizer: Tokenizer, encoding_errors: str, workers: int
) -> Iterator[tuple[np.ndarray, int]]:
    """(token array, text bytes) of `tasks` in order; several processes when there is enough work, with at most two
    tasks per process in flight so memory stays bounded however large the corpus."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _tokenize_task(task, tokenizer, encoding_errors)
        return
    # Fork on Linux, as torch's DataLoader does: workers start at once, need no `__main__` guard in the
    # caller's script and only run tokenizers. Elsewhere fork is unsafe, so spawn.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else Hugging Face warns in every forked worker
    with ProcessPoolExecutor(workers, context, _init_worker, (tokenizer, encoding_errors)) as pool:
        queued = iter(tasks)
        pending = deque(pool.submit(_tokenize_in_worker, task) for task in itertools.islice(queued, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(_tokenize_in_worker, task) for task in itertools.islice(queued, 1))
            yield result


# ---------------------------------------------------------------- prepared corpora


@dataclass
class PreparedCorpus:
    """Token shards on disk, memory mapped, with the tokenizer that made them and their metadata."""

    directory: Path
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    meta: dict
    reused: bool = False  # found already prepared, nothing tokenized


def load_prepared(directory: str | Path) -> PreparedCorpus:
    """A corpus written by `prepare_corpus`."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise GptlabError(f"no prepared corpus in {directory} (missing {META_FILE}); run gptlab prepare")
    meta = json.loads(meta_path.read_text())
    shards = [np.memmap(directory / f"{name}.bin", dtype=meta["dtype"], mode="r") for name in SHARDS]
    return PreparedCorpus(directory, load_tokenizer(directory), shards[0], shards[1], meta)


def short_vocabulary_note(config: DataConfig, tokenizer) -> str | None:
    """What to tell the user when a trained BPE came out smaller than asked (a small corpus holds no more
    merges); the model's vocabulary follows the tokenizer's."""
    if config.tokenizer != "bpe" or tokenizer.vocab_size >= config.vocab_size:
        return None
    return (
        f"the corpus yields a BPE vocabulary of {tokenizer.vocab_size:,} ids, fewer than the {config.vocab_size:,} "
        "asked: it holds no more pairs to merge"
    )


def prepare_corpus(
    config: DataConfig,
    tokenizer: Tokenizer | None = None,
    cache: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    out: Path | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
    encoding_errors: str | None = None,
) -> PreparedCorpus:
    """Tokenize `config.source` into train/val shards, or reuse the ones already prepared from the same
    source bytes with the same tokenizer.

    `tokenizer` None builds one of kind `config.tokenizer` (a `bpe` is trained on the train split only).
    The shards go to `out`, else to `cache/<key>` (cache default: GPTLAB_CACHE/prepared). `progress` is
    called with (bytes done, bytes in all). `encoding_errors` (default: the config's) "replace" turns invalid
    UTF-8 into U+FFFD.
    """
    from gptlab.download import cache_dir

    if not 0 < config.val_fraction < 1:
        raise GptlabError(f"val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    encoding_errors = encoding_errors or config.encoding_errors
    if encoding_errors not in ("strict", "replace"):
        raise GptlabError(f"encoding_errors must be strict or replace, got {encoding_errors!r}")
    # A given tokenizer is identified by its fingerprint; it also matches shards prepared by training the
    # same tokenizer from the config (a resumed run passes the tokenizer it saved).
    specs = [tokenizer.fingerprint()] if tokenizer else []
    if tokenizer is None or tokenizer.kind == config.tokenizer:
        specs.append(_tokenizer_spec(config))
    description, units = _resolve_source(config.source)
    source_sha256, files = _source_sha256(units)
    identity = {
        "format": FORMAT_VERSION,
        "source_sha256": source_sha256,
        "val_fraction": config.val_fraction,
        "encoding_errors": encoding_errors,
    }
    root = Path(cache or cache_dir() / "prepared")
    keys = [hashlib.sha256(json.dumps([identity, spec]).encode()).hexdigest()[:20] for spec in specs]
    directories = [Path(out)] if out is not None else [root / key for key in keys]
    for directory in directories:
        if _is_prepared(directory, identity, specs[-1], tokenizer):
            return dataclasses.replace(load_prepared(directory), reused=True)
    directory = directories[0]
    if directory.exists() and not (directory / META_FILE).is_file() and any(directory.iterdir()):
        raise GptlabError(f"{directory} exists and is not a prepared corpus; choose an empty or new folder")

    started = time.perf_counter()
    cut, split = _split_point(units, config.val_fraction)
    total = sum(u.size for u in units)
    if tokenizer is None:
        train_texts = (
            text for p in _pieces(units, 0, cut, chunk_bytes) for text, _ in _piece_texts(p, encoding_errors)
        )
        tokenizer = build_tokenizer(config.tokenizer, train_texts, config.vocab_size)

    _remove_abandoned(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ranges = {"train": (0, cut), "val": (cut, total)}
        counts = _write_shards(tmp, units, ranges, tokenizer, chunk_bytes, workers, encoding_errors, progress)
        if not counts["train"] or not counts["val"]:
            empty = "train" if not counts["train"] else "validation"
            raise GptlabError(
                f"the {empty} split of {description} holds no text; add documents or change --val-fraction"
            )
        tokenizer.save(tmp)
        meta = {
            **identity,
            "tokenizer_spec": specs[0],
            "source": description,
            "files": files,
            "tokenizer": {
                "kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
                "fingerprint": tokenizer.fingerprint(),
            },
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "split": split,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_bytes": counts["train_bytes"],  # of the text tokenized, not of the files
            "val_bytes": counts["val_bytes"],
            "val_bytes_per_token": counts["val_bytes"] / max(counts["val"], 1),
            "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        # Another process may have prepared the same corpus meanwhile (two runs started together): its
        # shards are as good, and may be open already, so they are kept.
        def ready() -> bool:
            return _is_prepared(directory, identity, specs[-1], tokenizer)

        if not ready():
            shutil.rmtree(directory, ignore_errors=True)
            try:
                os.replace(tmp, directory)
            except OSError:
                if not ready():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(directory)


def _write_shards(
    folder: Path,
    units: list[_Unit],
    ranges: dict[str, tuple[int, int]],
    tokenizer: Tokenizer,
    chunk_bytes: int,
    workers: int | None,
    encoding_errors: str,
    progress: Callable[[int, int], None] | None,
) -> dict[str, int]:
    """Tokenize each named byte range of the corpus into `folder/<name>.bin`; the token count of each, and
    under `<name>_bytes` the UTF-8 bytes of the text tokenized."""
    workers = workers or min(os.cpu_count() or 1, 8)
    total = sum(hi - lo for lo, hi in ranges.values())
    counts, done = {}, 0
    for name, (lo, hi) in ranges.items():
        tasks = list(_tasks(_pieces(units, lo, hi, chunk_bytes), chunk_bytes))
        counts[name] = counts[f"{name}_bytes"] = 0
        with open(folder / f"{name}.bin", "wb") as f:
            for task, (ids, text_bytes) in zip(
                tasks, _tokenized(tasks, tokenizer, encoding_errors, workers), strict=True
            ):
                f.write(ids.tobytes())
                counts[name] += len(ids)
                counts[f"{name}_bytes"] += text_bytes
                done += sum(p.end - p.start for p in task)
                if progress:
                    progress(done, total)
    return counts


def _tokenizer_spec(config: DataConfig) -> str:
    """What identifies the tokenizer `prepare_corpus` will build, before building it."""
    if config.tokenizer not in KINDS:
        raise GptlabError(f"unknown tokenizer kind {config.tokenizer!r}; choose one of {', '.join(KINDS)}")
    if config.tokenizer == "bpe":
        check_bpe_vocab_size(config.vocab_size)
        return f"bpe-trained-{config.vocab_size}"
    return config.tokenizer


def _remove_abandoned(directory: Path) -> None:
    """Delete the temporary folders of earlier preparations of `directory` whose process is gone (killed):
    on a real corpus each holds gigabytes of half-written shards."""
    for tmp in directory.parent.glob(f"{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _is_prepared(directory: Path, identity: dict[str, Any], spec: str, tokenizer: Tokenizer | None) -> bool:
    """Whether `directory` holds complete shards of the same source, split and tokenizer."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):  # damaged (a disk that filled, an edit): prepared again
        return False
    if not isinstance(meta, dict) or any(meta.get(name) != value for name, value in identity.items()):
        return False
    if tokenizer is not None and meta["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
        return False
    if tokenizer is None and meta["tokenizer_spec"] != spec:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(
        (directory / f"{name}.bin").is_file()
        and (directory / f"{name}.bin").stat().st_size == meta[f"{name}_tokens"] * itemsize
        for name in SHARDS
    )


# ---------------------------------------------------------------- batches


def _check_windows(tokens: np.ndarray, context_length: int, what: str = "the data") -> None:
    if context_length < 1:
        raise GptlabError(f"context_length must be positive, got {context_length}")
    if len(tokens) < context_length + 1:
        raise GptlabError(
            f"there are {len(tokens)} tokens in {what}, fewer than one window of context_length + 1 = "
            f"{context_length + 1}; use more text or a shorter context length (--model.context_length)"
        )


def _batch(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for windows starting at `starts`."""
    import torch

    windows = np.stack([tokens[s : s + context_length + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
    return torch.from_numpy(np.ascontiguousarray(windows[:, :-1])), torch.from_numpy(
        np.ascontiguousarray(windows[:, 1:])
    )


class RandomWindows:
    """Endless batches of windows at uniformly random offsets: fast, for long pretraining.

    Batch n is drawn from a generator seeded by (seed, rank, n), so resuming needs only the step and each
    rank has its own stream."""

    kind = "random"

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_windows(tokens, context_length)
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def next_batch(self) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)
        self.step += 1
        return _batch(self.tokens, starts, self.context_length)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(self, state)
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()


class SequentialWindows:
    """The book's sliding window: windows every `stride` tokens, each used once per epoch, in an order
    shuffled per epoch under the seed. Ranks take disjoint, equal shares of every epoch's windows."""

    kind = "sequential"

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        stride: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        _check_windows(tokens, context_length)
        self.stride = stride or context_length
        if self.stride < 1:
            raise GptlabError(f"stride must be positive, got {self.stride}")
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.num_windows = len(range(0, len(tokens) - context_length, self.stride))
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank == 0:
            raise GptlabError(f"{self.num_windows} windows cannot be shared by {world_size} ranks; use more text")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch."""
        if self._order_epoch != self.epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = order[self.rank :: self.world_size][: self.windows_per_rank]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[Tensor, Tensor]:
        indices = []
        while len(indices) < self.batch_size:
            order = self._epoch_order()
            take = order[self.position : self.position + self.batch_size - len(indices)]
            indices.extend(take.tolist())
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return _batch(self.tokens, np.array(indices) * self.stride, self.context_length)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the state left off; saved with another number of ranks, the share of the epoch
        already seen is kept (the exact windows differ, since the epoch is dealt out differently)."""
        _check_kind(self, state)
        self.seed, self.epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        saved_world = int(state.get("world_size", self.world_size))
        self.position = position * saved_world // self.world_size
        if self.position >= self.windows_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        self._order_epoch = -1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()


def _check_kind(sampler: RandomWindows | SequentialWindows, state: dict[str, Any]) -> None:
    if state.get("kind") != sampler.kind:
        raise GptlabError(f"cannot resume a {sampler.kind} sampler from the state of a {state.get('kind')} one")


SAMPLERS = {"random": RandomWindows, "sequential": SequentialWindows}


def make_sampler(
    tokens: np.ndarray,
    context_length: int,
    batch_size: int,
    kind: str = "random",
    stride: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> RandomWindows | SequentialWindows:
    """A batch sampler over a token shard: `random` windows or `sequential` ones every `stride` tokens."""
    if kind not in SAMPLERS:
        raise GptlabError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0 <= rank < world_size:
        raise GptlabError(f"rank {rank} is outside a world of {world_size}")
    if batch_size < 1:
        raise GptlabError(f"batch_size must be positive, got {batch_size}")
    if kind == "random":
        return RandomWindows(tokens, context_length, batch_size, seed, rank, world_size)
    return SequentialWindows(tokens, context_length, batch_size, stride, seed, rank, world_size)


def eval_batches(
    tokens: np.ndarray, context_length: int, batch_size: int, max_batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Up to `max_batches` full batches of non-overlapping windows spread evenly over `tokens` (the same
    every call); a split too short for one full batch gives one smaller batch of all its windows."""
    _check_windows(tokens, context_length, "the validation split")
    fits = (len(tokens) - 1) // context_length  # non-overlapping windows that fit
    count = min(max_batches * batch_size, fits)
    if count >= batch_size:
        count -= count % batch_size
    starts = np.linspace(0, len(tokens) - context_length - 1, count).round().astype(np.int64)
    return [_batch(tokens, starts[i : i + batch_size], context_length) for i in range(0, count, batch_size)]


# ---------------------------------------------------------------- torch Dataset / DataLoader


class WindowDataset:
    """The sliding windows as a map-style torch Dataset: item i is (x, y) for the window at i * stride.

    A memory-mapped shard is reopened in each DataLoader worker instead of being copied into it."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int | None = None):
        _check_windows(tokens, context_length)
        self.context_length, self.stride = context_length, stride or context_length
        self.tokens = tokens
        self._length = len(range(0, len(tokens) - context_length, self.stride))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        import torch

        if not 0 <= index < self._length:
            raise IndexError(index)
        start = index * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap) and self.tokens.filename:
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.name, self.tokens.offset, len(self.tokens))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, offset, length = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=(length,))
        self.__dict__.update(state)


def make_dataloader(
    tokens: np.ndarray,
    context_length: int,
    batch_size: int,
    stride: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    pin_memory: bool | None = None,
):
    """A torch DataLoader over the sliding windows; pinned memory by default when CUDA is available."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        WindowDataset(tokens, context_length, stride),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
