"""Scoring a language model on held-out text: loss per token, perplexity and bits per byte.

The text is tokenized with the run's own tokenizer into the same cached train/validation shards that
`gptlab prepare` and `gptlab pretrain` use. Windows of the model's context slide over the tokens by
`stride`: every target is scored exactly once, and a window scores only the targets that the previous
window did not reach, so with a stride below the context every scored token (but those of the first
window) sees at least `context - stride` tokens before it. A stride equal to the context is the
non-overlapping evaluation that training reports as `val_loss`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.model import IGNORE_INDEX


@dataclass
class TextScore:
    """What scoring a token stream measured."""

    tokens: int  # targets scored
    loss: float  # mean negative log-likelihood per token, in nats
    bytes: int = 0  # UTF-8 bytes of the text behind the scored tokens (0: unknown)
    seconds: float = 0.0
    windows: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss * self.tokens / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens, "loss": self.loss, "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte, "bytes": self.bytes, "windows": self.windows,
            "seconds": self.seconds, **self.extra,
        }  # fmt: skip


def check_stride(stride: int, context: int) -> None:
    if not 0 < stride <= context:
        raise GptlabError(f"stride must be between 1 and the context length {context}, got {stride}")


def sliding_windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) for each window over a stream of `n_tokens`: inputs are tokens[begin:end],
    targets tokens[begin + 1:end + 1], and only the last `scored` targets count (the others were scored
    by an earlier window). Together the windows score targets 1 .. n_tokens - 1 once each."""
    check_stride(stride, context)
    last = n_tokens - 1  # inputs end here at most: the final token is only ever a target
    done = 0
    for begin in range(0, max(last, 0), stride):
        end = min(begin + context, last)
        if end > done:
            yield begin, end, end - done
            done = end
        if end == last:
            return


def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> TextScore:
    """Mean loss of `model` over every target of `tokens` (a 1-D array of ids), by sliding windows."""
    if len(tokens) < 2:
        raise GptlabError(f"{len(tokens)} token(s) to score; the text needs at least two tokens")
    windows = list(sliding_windows(len(tokens), context, stride))
    total, count = 0.0, 0
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            group = windows[start : start + batch_size]
            width = max(end - begin for begin, end, _ in group)
            inputs = torch.zeros((len(group), width), dtype=torch.long)
            targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
            for row, (begin, end, scored) in enumerate(group):
                window = torch.from_numpy(np.asarray(tokens[begin : end + 1], dtype=np.int64))
                inputs[row, : end - begin] = window[:-1]
                targets[row, end - begin - scored : end - begin] = window[1 + end - begin - scored :]
            losses = model(inputs.to(device), targets.to(device), reduction="none")
            total += float(losses.double().sum())
            count += int((targets != IGNORE_INDEX).sum())
            if progress is not None:
                progress(count, len(tokens) - 1)
    return TextScore(count, total / count, seconds=time.perf_counter() - started, windows=len(windows))


def score_run(
    run_path: str,
    source: str | None = None,
    split: str = "val",
    stride: int | None = None,
    context: int | None = None,
    batch_size: int = 8,
    max_tokens: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> TextScore:
    """Score a run's language model on a text source (default: the run's own training data) with its tokenizer.

    `split` is val (the held-out part, as training cut it), train, or all; `max_tokens` (0: all) keeps
    the first that many targets of the split.
    """
    from gptlab.config import DataConfig, config_from_dict
    from gptlab.data import prepare_corpus
    from gptlab.generate import load_generator
    from gptlab.train import Runtime, resolve_autocast, resolve_device

    if split not in ("val", "train", "all"):
        raise GptlabError(f"split must be val, train or all, got {split!r}")
    # fp32 weights under the dtype's autocast, as training evaluates: the two losses compare.
    target = resolve_device(device)
    runtime = Runtime(target, resolve_autocast(dtype, target))
    run = load_generator(run_path, device, "fp32", command="eval perplexity")
    model_context = run.model.config.context_length
    context = context or model_context
    if context > model_context:
        raise GptlabError(f"context {context} exceeds the model's context length {model_context}")
    stride = stride or context
    check_stride(stride, context)  # before tokenizing the text, which may take long
    data = dict(run.config.get("data") or {})
    if source is None and "source" not in data:
        raise GptlabError(f"{run_path} does not record the text it was trained on; name one with --data FILE_OR_NAME")
    data = config_from_dict(DataConfig, {**data, **({"source": source} if source is not None else {})}, "data.")
    corpus = prepare_corpus(data, tokenizer=run.tokenizer)
    parts = {"val": [corpus.val_tokens], "train": [corpus.train_tokens]}
    parts["all"] = parts["train"] + parts["val"]
    if max_tokens:  # cut before joining the parts: a memory map is copied only as far as needed
        parts[split] = _first_tokens(parts[split], max_tokens + 1)
    tokens = parts[split][0] if len(parts[split]) == 1 else np.concatenate(parts[split])
    with runtime.autocast():
        score = score_tokens(run.model, tokens, context, stride, batch_size, target, progress)
    score.bytes = text_bytes(run.tokenizer, tokens[1:])  # the first token is only ever an input
    score.extra = {
        "run": str(run.checkpoint), "source": corpus.meta.get("source", data.source), "split": split,
        "context": context, "stride": stride, "tokenizer": run.tokenizer.kind,
    }  # fmt: skip
    return score


def _first_tokens(parts: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` tokens of the parts laid end to end, still as parts."""
    kept = []
    for part in parts:
        if count <= 0:
            break
        kept.append(part[:count])
        count -= len(kept[-1])
    return kept


def text_bytes(tokenizer, tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """UTF-8 bytes of the text `tokens` encode, the denominator of bits per byte: each id's bytes, counted
    over the stream in chunks (a memory map is never copied whole), with end-of-text as none, since it
    separates documents rather than standing for text."""
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[tokenizer.eot_id] = 0
    counts = np.zeros(len(lengths), dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[start : start + chunk], dtype=np.int64), minlength=len(lengths))
    return int(counts @ lengths)
