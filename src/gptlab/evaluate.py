"""Scoring a language model: loss per token, perplexity and bits per byte on held-out text, and accuracy on
multiple-choice items.

The text is tokenized with the run's own tokenizer into the same cached train/validation shards that
`gptlab prepare` and `gptlab pretrain` use. Windows of the model's context slide over the tokens by
`stride`: every target is scored exactly once, and a window scores only the targets that the previous
window did not reach, so with a stride below the context every scored token (but those of the first
window) sees at least `context - stride` tokens before it. A stride equal to the context is the
non-overlapping evaluation that training reports as `val_loss`.

A multiple-choice item (HellaSwag's kind) is scored by the log-likelihood of each choice as the
continuation of its context; the highest wins (`score_choices`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    if split not in ("val", "train", "all"):
        raise GptlabError(f"split must be val, train or all, got {split!r}")
    run, runtime = scoring_model(run_path, device, dtype, "eval perplexity")
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
        score = score_tokens(run.model, tokens, context, stride, batch_size, runtime.device, progress)
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


# ---------------------------------------------------------------- multiple choice

# The keys a multiple-choice item may use, in order of preference; HellaSwag's files use the first of each.
CONTEXT_KEYS, CHOICE_KEYS, LABEL_KEYS = (
    ("ctx", "context", "prompt", "question"),
    ("endings", "choices"),
    ("label", "answer"),
)


@dataclass
class ChoiceItem:
    """A multiple-choice question: a context, the texts that may continue it, and the index of the right one."""

    context: str
    choices: list[str]
    label: int


def read_choice_items(path: str | Path, limit: int = 0) -> list[ChoiceItem]:
    """Multiple-choice items from JSON lines: a context (`ctx`, `context`, `prompt` or `question`), its
    choices (`endings` or `choices`, at least two texts) and the right one's index (`label` or `answer`).
    HellaSwag's own files read as they are. `limit` (0: all) keeps the first items."""
    import json

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path} is not a file; give a JSON-lines file of multiple-choice items")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GptlabError(f"{path} line {number} is not JSON ({exc.msg})") from None
        items.append(_choice_item(record, f"{path} line {number}"))
        if limit and len(items) == limit:
            break
    if not items:
        raise GptlabError(f"{path} holds no multiple-choice items")
    return items


def _choice_item(record: Any, where: str) -> ChoiceItem:
    if not isinstance(record, dict):
        raise GptlabError(f"{where} is not a JSON object")

    def first_of(keys: tuple[str, ...]) -> Any:
        for key in keys:
            if key in record:
                return record[key]
        raise GptlabError(f"{where} has none of the keys {', '.join(keys)}")

    context, choices, label = first_of(CONTEXT_KEYS), first_of(CHOICE_KEYS), first_of(LABEL_KEYS)
    if not isinstance(context, str):
        raise GptlabError(f"{where}: the context must be text")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise GptlabError(f"{where}: the choices must be a list of at least two non-empty texts")
    if isinstance(label, str) and label.strip().isdigit():  # some files store the index as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise GptlabError(f"{where}: the label must be the index of a choice, 0 to {len(choices) - 1}, got {label!r}")
    return ChoiceItem(context, choices, label)


@dataclass
class ChoiceScore:
    """How a language model did on multiple-choice items. Each item's pick is the choice of the highest
    log-likelihood (`accuracy`), of the highest per token (`accuracy_per_token`: the `acc_norm` of
    nanoGPT's and llm.c's HellaSwag scripts) or per byte of its text (`accuracy_per_byte`: as
    lm-evaluation-harness's `acc_norm`, which counts characters; long choices are not penalised for their
    length). `choices[i][j]` holds item i's choice j's log-likelihood (nats), tokens and bytes."""

    labels: list[int]
    choices: list[list[dict]]
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    RULES = {"accuracy": "log_likelihood", "accuracy_per_token": "per_token", "accuracy_per_byte": "per_byte"}

    @property
    def items(self) -> int:
        return len(self.labels)

    def picks(self, rule: str) -> list[int]:
        key = self.RULES[rule]
        return [max(range(len(scored)), key=lambda j: scored[j][key]) for scored in self.choices]

    def accuracy(self, rule: str = "accuracy") -> tuple[float, float]:
        """(accuracy, its standard error) by one of the RULES; the error as lm-evaluation-harness gives it,
        the sample standard deviation of the right/wrong outcomes over the square root of their count."""
        right = [int(pick == label) for pick, label in zip(self.picks(rule), self.labels, strict=True)]
        mean = sum(right) / len(right)
        return mean, math.sqrt(mean * (1 - mean) / max(len(right) - 1, 1))

    def as_dict(self) -> dict:
        values: dict[str, Any] = {"items": self.items}
        for rule in self.RULES:
            values[rule], values[f"{rule}_stderr"] = self.accuracy(rule)
        return {**values, "seconds": self.seconds, **self.extra}

    def details(self) -> Iterator[dict]:
        """One record per item: its label, each rule's pick and each choice's scores."""
        picks = {rule: self.picks(rule) for rule in self.RULES}
        for i, (label, scored) in enumerate(zip(self.labels, self.choices, strict=True)):
            yield {"item": i, "label": label, **{f"pick_{r}": picks[r][i] for r in self.RULES}, "choices": scored}


def score_choices(
    model: torch.nn.Module,
    tokenizer,
    items: list[ChoiceItem],
    separator: str = " ",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> ChoiceScore:
    """Score each choice as the continuation of its context (`context + separator + choice`): the sum of
    its tokens' log-probabilities, on the model's own device. The context and the choice are tokenized
    apart, so every choice starts on a token boundary; a context too long for the model keeps its end."""
    sequences = [_choice_sequence(tokenizer, item, choice, separator, model.config.context_length)
                 for item in items for choice in item.choices]  # fmt: skip
    device = next(model.parameters()).device
    totals: list[float] = []
    started, was_training = time.perf_counter(), model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                totals += _choice_log_likelihoods(model, sequences[start : start + batch_size], device)
                if progress is not None:
                    progress(min(start + batch_size, len(sequences)), len(sequences))
    finally:
        model.train(was_training)
    scores, at = [], 0
    for item in items:
        scored = []
        for choice in item.choices:
            total, tokens, size = totals[at], sequences[at][1], len((separator + choice).encode("utf-8"))
            scored.append({"log_likelihood": total, "tokens": tokens, "bytes": size, "per_token": total / tokens,
                           "per_byte": total / size})  # fmt: skip
            at += 1
        scores.append(scored)
    return ChoiceScore([item.label for item in items], scores, time.perf_counter() - started)


def _choice_log_likelihoods(model, group: list[tuple[list[int], int]], device) -> list[float]:
    """The summed log-probabilities of each sequence's last `scored` tokens, right-padded into one batch."""
    width = max(len(ids) for ids, _ in group) - 1
    inputs = torch.zeros((len(group), width), dtype=torch.long)
    targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, scored) in enumerate(group):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, len(ids) - 1 - scored : len(ids) - 1] = torch.tensor(ids[-scored:])
    losses = model(inputs.to(device), targets.to(device), reduction="none")
    return (-losses.double().sum(1)).tolist()


def _choice_sequence(tokenizer, item: ChoiceItem, choice: str, separator: str, context_length: int):
    """(token ids, how many of the last are the choice's) for one choice; an empty context starts from
    end-of-text, as generation does, so that the choice's first token has something before it."""
    context = tokenizer.encode(item.context) or [tokenizer.eot_id]
    continuation = tokenizer.encode(separator + choice)
    if len(continuation) > context_length:
        raise GptlabError(
            f"a choice of {len(continuation)} tokens does not fit the model's context of {context_length}: "
            f"{choice[:60]!r}"
        )
    ids = (context + continuation)[-(context_length + 1) :]  # inputs are all but the last: the context's worth
    return ids, len(continuation)


def scoring_model(run_path: str, device: str, dtype: str, command: str):
    """(run, runtime) of a run's language model to score with: fp32 weights on the device, under the dtype's
    autocast, as training evaluates, so that the numbers compare with its validation loss."""
    from gptlab.generate import load_generator
    from gptlab.train import Runtime, resolve_autocast, resolve_device

    target = resolve_device(device)
    return load_generator(run_path, device, "fp32", command=command), Runtime(target, resolve_autocast(dtype, target))


def score_choices_run(
    run_path: str,
    data: str,
    separator: str = " ",
    limit: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> ChoiceScore:
    """A run's language model on a JSON-lines file of multiple-choice items (`read_choice_items`)."""
    items = read_choice_items(data, limit)  # before loading the model: a bad file is said at once
    run, runtime = scoring_model(run_path, device, dtype, "eval choice")
    with runtime.autocast():
        score = score_choices(run.model, run.tokenizer, items, separator, batch_size, progress)
    score.extra = {"run": str(run.checkpoint), "data": str(data), "separator": separator,
                   "choices": sum(len(item.choices) for item in items)}  # fmt: skip
    return score
