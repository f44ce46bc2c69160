"""Text classification with a GPT: labelled tables, the classifier (a GPT whose LM head maps to labels),
its objective and metrics, few-shot classification by label likelihood, and the finetuning run.

A classification run directory holds, besides config.yaml (`task: classify`, with the label names in
id order as `classify.labels`), tokenizer/, checkpoints/ and metrics.jsonl:
    split.json          the source's line numbers in the train, validation and test splits
    test_metrics.json   accuracy, precision, recall and F1 (per label and macro), confusion matrices
    curves.png          loss and accuracy against steps
    confusion_matrix.png
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptlab import checkpoint as ckpt
from gptlab import distributed
from gptlab.config import ClassifyConfig, GPTConfig, LoRAConfig, TrainConfig, finetuning_model_values
from gptlab.errors import GptlabError
from gptlab.model import GPT, Linear
from gptlab.sizing import ALL_TRAINS, Trainable, trainable_parts

SPLITS = ("train", "validation", "test")
SPLIT_FILE = "split.json"
METRICS_FILE = "test_metrics.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"

# Named data sets that are labelled tables: their format and the names of their header-less columns.
NAMED_TABLES: dict[str, tuple[str, list[str]]] = {"sms-spam": ("tsv", ["label", "text"])}

# ---------------------------------------------------------------- reading labelled tables


@dataclass
class Table:
    """Texts and their labels (None when the file has no label column), with each row's line number."""

    texts: list[str]
    labels: list[str | None]
    lines: list[int]
    source: str


def resolve_source(config: ClassifyConfig) -> tuple[Path, str, list[str]]:
    """The file, format and header-less column names a config's `source` names (a path or a data set)."""
    path = Path(config.source).expanduser()
    if path.is_file():
        fmt = config.format if config.format != "auto" else sniff_format(path)
        return path, fmt, list(config.columns)
    if config.source in NAMED_TABLES:
        from gptlab.download import dataset_path

        fmt, columns = NAMED_TABLES[config.source]
        return dataset_path(config.source), fmt, list(config.columns) or columns
    named = ", ".join(NAMED_TABLES)
    raise GptlabError(f"classify.source {config.source!r} is neither a file nor a labelled data set ({named})")


def sniff_format(path: Path) -> str:
    """tsv, csv or jsonl: by the file's extension, else by its first line."""
    by_suffix = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl"}
    if path.suffix.lower() in by_suffix:
        return by_suffix[path.suffix.lower()]
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    raise GptlabError(f"cannot tell the format of {path} (no tab or comma on its first line); set classify.format")


def _delimited_rows(path: Path, fmt: str, columns: list[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, (line, row) pairs) of a TSV (no quoting) or CSV (quoted fields) file."""
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        records = []
        for fields in reader:
            if fields:
                records.append((reader.line_num, fields))
    if not records:
        raise GptlabError(f"{path} holds no rows")
    names = columns or [name.strip() for name in records.pop(0)[1]]
    rows = []
    for line, fields in records:
        if len(fields) != len(names):
            raise GptlabError(
                f"{path} line {line} has {len(fields)} {fmt} fields where {len(names)} columns ({', '.join(names)}) "
                f"are expected: mixed delimiters? (fix the line, or set classify.format / classify.columns)"
            )
        rows.append((line, dict(zip(names, fields, strict=True))))
    return names, rows


def _json_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise GptlabError(f"{path} line {line_number} is not a JSON object (expected JSON lines)") from None
            if not isinstance(row, dict):
                raise GptlabError(f"{path} line {line_number} is JSON but not an object with named fields")
            rows.append((line_number, row))
    names = list(dict.fromkeys(key for _, row in rows for key in row))
    return names, rows


def _check_column(name: str, names: list[str], path: Path, option: str) -> None:
    if name not in names:
        from gptlab.config import _suggest

        raise GptlabError(
            f"column {name!r} is not in {path} (its columns: {', '.join(names) or 'none'}){_suggest(name, names)}; "
            f"set {option}"
        )


def _field(row: dict[str, Any], column: str, line: int, path: Path, types: tuple[type, ...], kind: str) -> Any:
    """The row's value in `column` (None for JSON null); a missing field or a value of another type is a
    one-line error. Only JSON lines can have either: a TSV or CSV row holds every column, as text."""
    if column not in row:
        raise GptlabError(f"{path} line {line} has no field {column!r}; remove the line or add the field")
    value = row[column]
    if value is not None and not isinstance(value, types):
        raise GptlabError(f"{path} line {line} holds {json.dumps(value)[:40]} in field {column!r}, not a {kind}")
    return value


def read_table(
    path: Path, fmt: str, columns: list[str], text_column: str, label_column: str, require_labels: bool = True
) -> Table:
    """The texts and labels of a TSV, CSV or JSON-lines file; every problem is a one-line error naming the line."""
    try:
        names, rows = _json_rows(path) if fmt == "jsonl" else _delimited_rows(path, fmt, columns)
    except UnicodeDecodeError:
        raise GptlabError(f"{path} is not UTF-8 text") from None
    if not rows:
        raise GptlabError(f"{path} holds no rows")
    _check_column(text_column, names, path, "the text column (classify.text_column)")
    has_labels = label_column in names
    if require_labels:
        _check_column(label_column, names, path, "the label column (classify.label_column)")
    texts, labels, lines = [], [], []
    for line, row in rows:
        text = _field(row, text_column, line, path, (str,), "string")
        if text is None or not text.strip():
            raise GptlabError(f"{path} line {line} has an empty text in column {text_column!r}; remove or fill it")
        label = _field(row, label_column, line, path, (str, int, float), "string or number") if has_labels else None
        if has_labels and (label is None or not str(label).strip()):
            raise GptlabError(f"{path} line {line} has no label in column {label_column!r}; remove or label it")
        texts.append(text)
        labels.append(None if label is None else str(label).strip())
        lines.append(line)
    return Table(texts, labels, lines, str(path))


def resolve_labels(found: Sequence[str], configured: Sequence[str], source: str) -> list[str]:
    """The label names in id order: the configured ones (which must cover the data) or the data's, sorted."""
    distinct = sorted(set(found))
    if configured:
        unknown = [label for label in distinct if label not in configured]
        if unknown:
            raise GptlabError(
                f"label {unknown[0]!r} in {source} is not among classify.labels ({', '.join(configured)}); "
                "add it there or fix the data"
            )
    if len(distinct) < 2:
        only = f"only the label {distinct[0]!r}" if distinct else "no labels"
        raise GptlabError(f"{source} holds {only}; a classifier needs examples of at least two labels")
    return list(configured) or distinct


# ---------------------------------------------------------------- splits


@dataclass
class Split:
    """One split: texts, their label ids, and their line numbers in the source."""

    texts: list[str]
    label_ids: list[int]
    lines: list[int]


@dataclass
class ClassificationData:
    labels: list[str]
    splits: dict[str, Split]
    source: str


def split_examples(label_ids: np.ndarray, config: ClassifyConfig) -> dict[str, np.ndarray]:
    """Row indices of each split: per label, a seeded shuffle (down-sampled to the rarest label when
    balancing) cut by the split fractions, so every split holds every label in the same proportions."""
    rng = np.random.default_rng(config.split_seed)
    by_label = [rng.permutation(np.flatnonzero(label_ids == k)) for k in range(int(label_ids.max()) + 1)]
    by_label = [rows for rows in by_label if len(rows)]
    if config.balance == "downsample":
        rarest = min(len(rows) for rows in by_label)
        by_label = [rows[:rarest] for rows in by_label]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for rows in by_label:
        n_train = int(len(rows) * config.split[0])
        n_val = int(len(rows) * config.split[1])
        for name, part in zip(SPLITS, np.split(rows, [n_train, n_train + n_val]), strict=True):
            parts[name].append(part)
    return {name: rng.permutation(np.concatenate(chunks)) for name, chunks in parts.items()}


def prepare_classification_data(config: ClassifyConfig) -> ClassificationData:
    """Read the labelled source, map labels to ids and split it; the same config gives the same splits."""
    path, fmt, columns = resolve_source(config)
    table = read_table(path, fmt, columns, config.text_column, config.label_column)
    labels = resolve_labels(table.labels, config.labels, table.source)
    label_ids = np.array([labels.index(label) for label in table.labels])
    splits = {}
    for name, rows in split_examples(label_ids, config).items():
        if len(rows) == 0:
            raise GptlabError(
                f"the {name} split of {table.source} is empty ({len(table.texts)} examples); "
                f"use more data or other classify.split fractions than {config.split}"
            )
        splits[name] = Split([table.texts[i] for i in rows], [int(label_ids[i]) for i in rows],
                             [table.lines[i] for i in rows])  # fmt: skip
    return ClassificationData(labels, splits, table.source)


def split_summary(data: ClassificationData) -> dict[str, Any]:
    """What split.json holds: the source, the labels, and each split's line numbers."""
    return {"source": data.source, "labels": data.labels, **{n: s.lines for n, s in data.splits.items()}}


# ---------------------------------------------------------------- tokens and batches


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to its first `max_length` tokens."""
    return [ids[:max_length] for ids in tokenizer.encode_batch(list(texts))]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (B, T), T the longest sequence, and the mask of real tokens (B, T)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = True
    return {"input": ids, "attention_mask": mask}


# ---------------------------------------------------------------- the classifier


class GPTClassifier(GPT):
    """A GPT whose LM head is replaced by a linear map to label logits (no bias, like GPT-2's `score`),
    read at the last real token or averaged over the real tokens.

    The state dict keeps the GPT's names (`lm_head.weight` is now labels x width), so pretrained weights,
    LoRA targets and exports apply unchanged.
    """

    def __init__(self, config: GPTConfig, num_labels: int, pooling: str = "last"):
        super().__init__(config)
        self.lm_head = Linear(config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        self.num_labels = num_labels
        self.pooling = pooling

    def forward(self, idx, attention_mask=None):
        """Label logits (B, L) of right-padded ids (B, T); attention_mask (B, T) marks the real tokens.

        Right padding comes after every real token, so causal attention already keeps it out of them:
        the model runs unmasked and only the pooling looks at the mask.
        """
        hidden = self.hidden_states(idx)  # (B, T, C)
        if attention_mask is None:
            attention_mask = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        if self.pooling == "mean":
            weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            last = (attention_mask.long().sum(1) - 1).clamp(min=0)  # (B,)
            pooled = hidden[torch.arange(idx.shape[0], device=idx.device), last]
        return self.lm_head(pooled)  # (B, L)


def build_classifier(model_config: GPTConfig, run_config: dict[str, Any]) -> GPTClassifier:
    """The classifier a classification run's config describes (its labels and pooling)."""
    section = run_config.get("classify") or {}
    labels = section.get("labels") or []
    if len(labels) < 2:
        raise GptlabError("the classification run's config.yaml names fewer than two labels (classify.labels)")
    return GPTClassifier(model_config, len(labels), section.get("pooling", "last"))


def load_pretrained(model: GPTClassifier, source: str | Path) -> Path:
    """Load a language model run's weights (all but its LM head) into `model`; returns the checkpoint."""
    checkpoint = ckpt.find_checkpoint(source)
    config = ckpt.read_run_config(ckpt.run_dir_of(checkpoint))
    if config.get("task") == "classify":
        raise GptlabError(f"{source} is already a classifier; finetune from a language model run instead")
    if config.get("lora"):
        raise GptlabError(f"{source} is a LoRA run; merge it first with `gptlab lora merge`")
    weights = ckpt.load_weights(checkpoint / ckpt.WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith("lm_head.")}, strict=False
    )
    missing = [name for name in missing if not name.startswith("lm_head.")]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise GptlabError(f"the weights of {checkpoint} do not fit the model ({what})")
    return checkpoint


def set_trainable(model: GPTClassifier, config: ClassifyConfig, lora: LoRAConfig | None = None) -> None:
    """Freeze all but what `config.trainable` names; the new head always trains. A model that already has
    its adapters (`checkpoint.build_model` of a LoRA run) keeps them."""
    if config.trainable == "lora":
        from gptlab.lora import apply_lora, has_adapters

        if not has_adapters(model):
            apply_lora(model, lora or LoRAConfig())  # freezes all but the adapters
    else:
        model.requires_grad_(config.trainable == "all")
    if config.trainable == "last_blocks":
        if config.last_blocks > len(model.blocks):
            raise GptlabError(
                f"classify.last_blocks is {config.last_blocks} but the model has {len(model.blocks)} blocks"
            )
        for block in model.blocks[-config.last_blocks :]:
            block.requires_grad_(True)
        model.ln_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)


# ---------------------------------------------------------------- metrics


def classification_report(true_ids: Sequence[int], predicted_ids: Sequence[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 per label and their unweighted (macro) means, and the confusion
    matrix (rows: true label, columns: predicted). A label never predicted has precision 0."""
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(true_ids), np.asarray(predicted_ids)), 1)
    hits = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    per_label = {
        label: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                "support": int(actual[k])}
        for k, label in enumerate(labels)
    }  # fmt: skip
    return {
        "count": int(confusion.sum()),
        "accuracy": float(hits.sum() / max(confusion.sum(), 1)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_label": per_label,
        "labels": list(labels),
        "confusion_matrix": confusion.tolist(),
    }


def flat_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The report's numbers as one flat dict of floats (for metrics.jsonl and progress lines)."""
    flat = {f"{prefix}{k}": report[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}
    for label, metrics in report["per_label"].items():
        flat.update({f"{prefix}{name}_{label}": metrics[name] for name in ("precision", "recall", "f1")})
    return flat


def format_report(report: dict[str, Any], title: str) -> str:
    """A report as text: per-label precision, recall, F1 and support, their macro means, the confusion matrix."""
    labels = report["labels"]
    width = max(len("macro"), *map(len, labels))
    cell = max(7, *map(len, labels))
    lines = [
        f"{title}: {report['count']} texts, accuracy {report['accuracy']:.2%}, macro F1 {report['f1_macro']:.4f}",
        f"  {'label':<{width}}  precision  recall      f1  support",
    ]
    for label in labels:
        m = report["per_label"][label]
        lines.append(
            f"  {label:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}"
        )
    lines.append(
        f"  {'macro':<{width}}  {report['precision_macro']:9.4f}  {report['recall_macro']:6.4f}  "
        f"{report['f1_macro']:6.4f}  {report['count']:7d}"
    )
    lines.append(f"  confusion matrix (rows: true label, columns: predicted)\n  {'':<{width}}"
                 + "".join(f"  {label:>{cell}}" for label in labels))  # fmt: skip
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"  {label:<{width}}" + "".join(f"  {count:>{cell}}" for count in row))
    return "\n".join(lines)


# ---------------------------------------------------------------- predicting


@torch.no_grad()
def predict_log_probs(
    model: GPTClassifier, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32, device="cpu"
) -> torch.Tensor:
    """Log-probabilities (N, L) of every label for every sequence, batched by length to limit padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.empty(len(sequences), model.num_labels)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([sequences[i] for i in rows], pad_id)
        logits = model(batch["input"].to(device), batch["attention_mask"].to(device))
        out[rows] = logits.float().log_softmax(-1).cpu()
    return out


def evaluate_split(
    model: GPTClassifier, sequences: Sequence[Sequence[int]], label_ids: Sequence[int], labels: list[str],
    pad_id: int, batch_size: int = 32, device="cpu",
) -> dict[str, Any]:  # fmt: skip
    """The classification report of one split, with its mean cross-entropy as `loss`."""
    return predictions_report(predict_log_probs(model, sequences, pad_id, batch_size, device), label_ids, labels)


def predictions_report(log_probs: torch.Tensor, label_ids: Sequence[int], labels: list[str]) -> dict[str, Any]:
    """The classification report of predicted log-probabilities (N, L), with their mean cross-entropy as `loss`."""
    targets = torch.as_tensor(list(label_ids))
    loss = F.nll_loss(log_probs, targets).item()
    return {"loss": loss, **classification_report(targets.tolist(), log_probs.argmax(-1).tolist(), labels)}


# ---------------------------------------------------------------- the training objective


def class_weights(label_ids: Sequence[int], num_labels: int) -> torch.Tensor:
    """Loss weights n / (labels * count) per label: every label weighs as much in the loss overall."""
    counts = torch.bincount(torch.as_tensor(list(label_ids)), minlength=num_labels).float()
    return torch.where(counts > 0, len(label_ids) / (num_labels * counts.clamp(min=1)), torch.zeros_like(counts))


class ClassificationObjective:
    """Finetuning a classifier: cross-entropy of the label on seeded, reshuffled-every-epoch batches
    (each rank of a distributed run takes its own batch of every step).

    Evaluation covers the whole validation split (and the accuracy on a fixed sample of training texts).
    """

    def __init__(
        self,
        model_config: GPTConfig,
        train: tuple[list[list[int]], list[int]],
        validation: tuple[list[list[int]], list[int]],
        labels: list[str],
        train_config: TrainConfig,
        pad_id: int,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        trainable: Trainable = ALL_TRAINS,
    ):
        from gptlab.sizing import train_flops_per_token

        self.train_sequences, self.train_labels = train
        self.val_sequences, self.val_labels = validation
        self.batch_size, self.rank, self.world_size = train_config.batch_size, rank, world_size
        if self.batch_size * world_size > len(self.train_sequences):
            raise GptlabError(
                f"train.batch_size {self.batch_size} on {world_size} rank(s) is larger than the training split "
                f"({len(self.train_sequences)} examples); lower it"
            )
        self.labels, self.pad_id, self.weights, self.seed = labels, pad_id, weights, train_config.seed
        mean_length = sum(map(len, self.train_sequences)) / len(self.train_sequences)
        self.tokens_per_batch = max(1, round(self.batch_size * mean_length))
        # No position's logits over the vocabulary: the classifier's head is a few labels wide.
        self.flops_per_token = train_flops_per_token(model_config, max(1, round(mean_length)), 0.0, trainable)
        sample = np.random.default_rng(self.seed).permutation(len(self.train_sequences))
        self.train_sample = sample[: train_config.eval_batches * self.batch_size]
        self.epoch, self.position = 0, 0
        self.order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_sequences))

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the next `world_size` batches of the epoch's order (the incomplete rest is dropped)."""
        span = self.batch_size * self.world_size
        if self.position + span > len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = self._permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        rows = self.order[start : start + self.batch_size]
        self.position += span
        batch = pad_batch([self.train_sequences[i] for i in rows], self.pad_id)
        batch["label"] = torch.as_tensor([self.train_labels[i] for i in rows])
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input"], batch["attention_mask"])
        weights = None if self.weights is None else self.weights.to(logits.device)
        return F.cross_entropy(logits.float(), batch["label"], weight=weights)

    def log_probs(self, model: torch.nn.Module, runtime, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """The predicted log-probabilities (N, labels) of `sequences`, each rank predicting its share."""
        return distributed.spread_rows(
            lambda share: predict_log_probs(model, share, self.pad_id, self.batch_size * 4, runtime.device),
            sequences,
            runtime,
            distributed.is_sharded(model),
        )

    def evaluate(self, model: torch.nn.Module, runtime) -> dict[str, float]:
        report = predictions_report(self.log_probs(model, runtime, self.val_sequences), self.val_labels, self.labels)
        train_log_probs = self.log_probs(model, runtime, [self.train_sequences[i] for i in self.train_sample])
        train_hits = train_log_probs.argmax(-1) == torch.as_tensor([self.train_labels[i] for i in self.train_sample])
        return {
            "val_loss": report["loss"],
            **flat_metrics(report, "val_"),
            "train_accuracy": train_hits.float().mean().item(),
        }

    def samples(self, model: torch.nn.Module, runtime) -> list[str]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.order = self._permutation(self.epoch)


# ---------------------------------------------------------------- zero- and few-shot classification

FEW_SHOT_MESSAGE = "Message: "
FEW_SHOT_LABEL = "\nLabel:"


def few_shot_examples(train: Split, labels: list[str], k: int, seed: int) -> list[tuple[str, str]]:
    """K (text, label) examples from the training split, the labels taking turns, in a seeded order."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(train.label_ids)
    pools = [list(rng.permutation(np.flatnonzero(ids == label))) for label in range(len(labels))]
    picked: list[int] = []
    while len(picked) < k and any(pools):
        picked += [pool.pop() for pool in pools if pool][: k - len(picked)]
    return [(train.texts[i], labels[train.label_ids[i]]) for i in rng.permutation(picked).tolist()]


@torch.no_grad()
def continuation_log_likelihoods(
    model: GPT, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8, device="cpu"
) -> torch.Tensor:
    """The summed log-probability (N,) of each continuation after its prompt, for (prompt, continuation) ids."""
    out = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([pairs[i][0] + pairs[i][1] for i in rows], pad_id)
        hidden = model.hidden_states(batch["input"].to(device))  # (B, T, C)
        for row, i in enumerate(rows):
            prompt, continuation = pairs[i]
            # The outputs at the positions before each continuation token predict it.
            logits = model.lm_head(hidden[row, len(prompt) - 1 : len(prompt) + len(continuation) - 1]).float()
            targets = torch.as_tensor(continuation, device=logits.device)[:, None]
            out[i] = logits.log_softmax(-1).gather(1, targets).sum().cpu()
    return out


def few_shot_scores(
    model: GPT, tokenizer, examples: Sequence[tuple[str, str]], texts: Sequence[str], labels: list[str],
    batch_size: int = 8, device="cpu",
) -> torch.Tensor:  # fmt: skip
    """Log-likelihood (N, L) of each label after a prompt of the K examples and the text:

        Message: <example text>\\nLabel: <its label>\\n\\n ... Message: <text>\\nLabel: <label?>

    Texts are cut to an equal share of the context so that the whole prompt fits.
    """
    context = model.config.context_length
    head, query_tail = tokenizer.encode(FEW_SHOT_MESSAGE), tokenizer.encode(FEW_SHOT_LABEL)
    example_tails = {label: tokenizer.encode(f"{FEW_SHOT_LABEL} {label}\n\n") for label in labels}
    continuations = [tokenizer.encode(" " + label) for label in labels]
    fixed = len(examples) * (len(head) + max(map(len, example_tails.values())))
    fixed += len(head) + len(query_tail) + max(map(len, continuations))
    budget = (context - fixed) // (len(examples) + 1)
    if budget < 1:
        raise GptlabError(
            f"{len(examples)} examples do not fit the model's context of {context} tokens; use fewer (--few-shot)"
        )
    example_ids = tokenizer.encode_batch([text for text, _ in examples]) if examples else []
    prefix = [i for ids, (_, label) in zip(example_ids, examples, strict=True)
              for i in head + ids[:budget] + example_tails[label]]  # fmt: skip
    queries = [prefix + head + ids[:budget] + query_tail for ids in tokenizer.encode_batch(list(texts))]
    pairs = [(query, continuation) for query in queries for continuation in continuations]
    scores = continuation_log_likelihoods(model, pairs, tokenizer.eot_id, batch_size, device)
    return scores.view(len(texts), len(labels))


def few_shot_classify(
    model: GPT, tokenizer, examples: Sequence[tuple[str, str]], texts: Sequence[str], labels: list[str],
    batch_size: int = 8, device="cpu",
) -> list[dict[str, Any]]:  # fmt: skip
    """Predictions by prompting: each label's probability is its likelihood normalised over the labels."""
    scores = few_shot_scores(model, tokenizer, examples, texts, labels, batch_size, device)
    return predictions(texts, scores.softmax(-1), labels)


def few_shot_evaluate(
    model: GPT, tokenizer, data: ClassificationData, examples: Sequence[tuple[str, str]], batch_size: int = 8,
    device="cpu",
) -> dict[str, Any]:  # fmt: skip
    """The classification report of prompting with `examples` on the test split."""
    test = data.splits["test"]
    scores = few_shot_scores(model, tokenizer, examples, test.texts, data.labels, batch_size, device)
    return {"shots": len(examples), **classification_report(test.label_ids, scores.argmax(-1).tolist(), data.labels)}


# ---------------------------------------------------------------- classifying with a run


def predictions(texts: Sequence[str], probabilities: torch.Tensor, labels: list[str]) -> list[dict[str, Any]]:
    """One {text, label, probabilities} record per text, the label the most probable one."""
    return [
        {"text": text, "label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist(), strict=True))}
        for text, p in zip(texts, probabilities, strict=True)
    ]


def token_limit(max_length: int, context_length: int) -> int:
    """Texts are cut to `max_length` tokens (0: the context), and never beyond the context."""
    return min(max_length or context_length, context_length)


def _checkpoint_and_task(path: str | Path, which: str) -> tuple[Path, str]:
    checkpoint = ckpt.find_checkpoint(path, which)
    return checkpoint, ckpt.read_run_config(ckpt.run_dir_of(checkpoint)).get("task") or "pretrain"


def load_language_model(path: str | Path, device="cpu", which: str = "latest") -> ckpt.LoadedRun:
    """A language model run to prompt (pretrained, imported, instruction-tuned); a classifier is an error."""
    checkpoint, task = _checkpoint_and_task(path, which)
    if task == "classify":
        raise GptlabError(
            f"{path} is a classifier, not a language model to prompt; drop --few-shot, or give a pretrained run"
        )
    return ckpt.load_run(checkpoint, device=device)


def load_classifier(path: str | Path, device="cpu", which: str = "latest") -> ckpt.LoadedRun:
    """A finetuned classification run, ready to classify; any other run is a one-line error."""
    checkpoint, task = _checkpoint_and_task(path, which)
    if task != "classify":
        raise GptlabError(
            f"{path} is not a classifier (task: {task}); finetune one with `gptlab finetune classify --init-from "
            f"{path}`, or prompt this model with --few-shot K --labels A,B"
        )
    return ckpt.load_run(checkpoint, device=device)


def classify_texts(run: ckpt.LoadedRun, texts: Sequence[str] | str, batch_size: int = 32, device="cpu") -> list[dict]:
    """The predicted label and the probability of every label for each text (or for one text)."""
    from gptlab.generate import as_texts

    texts = as_texts(texts)
    for number, text in enumerate(texts, 1):
        if not text.strip():  # finetuning refuses such texts too: the classifier has nothing to read
            raise GptlabError(f"text {number} is empty or only spaces; there is nothing to classify")
    max_length = token_limit(run.config["classify"].get("max_length", 0), run.model.config.context_length)
    sequences = encode_texts(run.tokenizer, texts, max_length)
    log_probs = predict_log_probs(run.model, sequences, run.tokenizer.eot_id, batch_size, device)
    return predictions(texts, log_probs.exp(), run.config["classify"]["labels"])


def evaluate_run(run: ckpt.LoadedRun, batch_size: int = 32, device="cpu") -> dict[str, Any]:
    """A classifier run's report on its test split, which its config reproduces (checked against split.json)."""
    from gptlab.config import config_from_dict

    config = config_from_dict(ClassifyConfig, run.config["classify"], where="classify.")
    data = prepare_classification_data(config)
    test = data.splits["test"]
    saved = run.run_dir / SPLIT_FILE
    if saved.is_file() and json.loads(saved.read_text()).get("test") != test.lines:
        raise GptlabError(
            f"{data.source} changed since {run.run_dir} was finetuned: its test split differs from {saved}"
        )
    sequences = encode_texts(run.tokenizer, test.texts, token_limit(config.max_length, run.model.config.context_length))
    return evaluate_split(run.model, sequences, test.label_ids, data.labels, run.tokenizer.eot_id, batch_size, device)


def score_predictions(
    records: Sequence[dict[str, Any]], true_labels: Sequence[str | None], labels: list[str], source: str
) -> dict[str, Any] | None:
    """The report of predictions against the texts' known labels; None when some text has none."""
    if not true_labels or any(label is None for label in true_labels):
        return None
    unknown = sorted(set(true_labels) - set(labels))
    if unknown:
        raise GptlabError(f"label {unknown[0]!r} in {source} is not one of the model's labels ({', '.join(labels)})")
    return classification_report([labels.index(label) for label in true_labels],
                                 [labels.index(record["label"]) for record in records], labels)  # fmt: skip


def read_texts(path: str | Path, text_column: str, label_column: str, columns: Sequence[str] = ()) -> Table:
    """Texts to classify: one per line of a .txt file, or a TSV/CSV/JSON-lines table (labels optional)."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"file {path} not found")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        return Table([line for _, line in kept], [None] * len(kept), [n for n, _ in kept], str(path))
    return read_table(path, sniff_format(path), list(columns), text_column, label_column, require_labels=False)


# ---------------------------------------------------------------- plots


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss, and training and validation accuracy, against steps, as a PNG."""
    from gptlab.train import pyplot, save_figure

    plt = pyplot()

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and "val_accuracy" in r]
    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if val:
        steps = [r["step"] for r in val]
        loss_ax.plot(steps, [r["val_loss"] for r in val], "o-", label="validation loss", color="tab:orange")
        accuracy_ax.plot(steps, [r["train_accuracy"] for r in val], "o-", label="train accuracy", color="tab:blue")
        accuracy_ax.plot(steps, [r["val_accuracy"] for r in val], "o-", label="validation accuracy",
                         color="tab:orange")  # fmt: skip
    for ax, name in ((loss_ax, "cross-entropy"), (accuracy_ax, "accuracy")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion(report: dict[str, Any], path: Path, title: str = "test split") -> None:
    """The confusion matrix as a PNG: counts in the cells, true labels down, predicted across."""
    from gptlab.train import pyplot, save_figure

    plt = pyplot()

    matrix, labels = np.asarray(report["confusion_matrix"]), report["labels"]
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{title}: accuracy {report['accuracy']:.2%}")
    for (row, col), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    save_figure(fig, path)


# ---------------------------------------------------------------- the finetuning run


@dataclass
class ClassifyResult:
    run_dir: Path
    train: Any  # gptlab.train.TrainResult
    test: dict[str, Any]
    validation: dict[str, Any]
    trainable_parameters: int = 0
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)


def resolve_classify_config(values: dict[str, Any]) -> dict[str, Any]:
    """The validated run config: finetuning defaults, the `init_from` run's model shape (stored with
    `init_from` as an absolute checkpoint folder), the sections as dataclasses; `lora` only for LoRA."""
    from gptlab.config import TASK_DEFAULTS, check_task, resolve_run_config

    # The model's shape comes from `init_from`, never from a preset.
    check_task(values, "classify")
    defaults = TASK_DEFAULTS["classify"]
    values = {**defaults, **{k: v for k, v in values.items() if k != "preset"}}
    values["train"] = {**defaults["train"], **(values.get("train") or {})}
    if not values.get("init_from"):
        raise GptlabError(
            "finetuning needs a pretrained run to start from: --init-from RUN "
            "(a gptlab run, or one made by `gptlab import gpt2`)"
        )
    base = ckpt.find_checkpoint(values["init_from"])
    values["init_from"] = str(base.resolve())  # a LoRA run finds its base weights there
    # The base run's shape; a config may change what does not touch the weights (dropout).
    base_model = ckpt.read_run_config(ckpt.run_dir_of(base))["model"]
    values["model"] = finetuning_model_values(base_model, values.get("model"), str(base))
    trainable = (values.get("classify") or {}).get("trainable", ClassifyConfig.trainable)
    if values.get("lora") and trainable != "lora":
        raise GptlabError("lora options are given but classify.trainable is not lora; add --classify.trainable lora")
    return resolve_run_config(values, ["model", "classify", "train"] + (["lora"] if trainable == "lora" else []))


def _write_reports(run_dir: Path, step: int, reports: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """test_metrics.json and the two plots; returns their paths."""
    from gptlab.train import METRICS_FILE as LOG_FILE
    from gptlab.train import MetricsLog

    files = {"metrics": run_dir / METRICS_FILE, "curves": run_dir / CURVES_FILE, "confusion": run_dir / CONFUSION_FILE}
    ckpt.atomic_write_text(files["metrics"], json.dumps({"step": step, **reports}, indent=2) + "\n")
    plot_curves(MetricsLog(run_dir / LOG_FILE).read(), files["curves"])
    plot_confusion(reports["test"], files["confusion"])
    return files


def _check_same_split(run_dir: Path, data: ClassificationData, allow_change: bool, log) -> None:
    """A resumed run trains on the split it began with: a labelled file changed since (other rows, other
    labels) is refused, unless --allow-config-change, when the new split is recorded in split.json."""
    saved = run_dir / SPLIT_FILE
    if not saved.is_file() or json.loads(saved.read_text()) == split_summary(data):
        return
    if not allow_change:
        raise GptlabError(
            f"the data of {data.source} changed since {run_dir} began (its split differs from {saved}); restore it, "
            "or resume with --allow-config-change to go on with the new data"
        )
    log(f"the data of {data.source} changed since the run began; going on with its new split")
    ckpt.atomic_write_text(saved, json.dumps(split_summary(data)) + "\n")


def finetune_classify(
    values: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> ClassifyResult:
    """Finetune the pretrained run `init_from` as a classifier as the run config `values` describes,
    then report the metrics on the validation and test splits and plot them into the run directory."""
    from gptlab import distributed
    from gptlab.config import run_config_to_dict
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train import check_resumed_task, check_run_dir, make_runtime, seed_everything, train

    started = time.perf_counter()
    if resume:
        check_resumed_task(values["out_dir"], "classify")
    config = resolve_classify_config(values)
    base, run_dir = Path(config["init_from"]), Path(config["out_dir"])
    runtime = make_runtime(config["train"])
    data = prepare_classification_data(config["classify"])
    if resume:
        _check_same_split(run_dir, data, allow_config_change, log)
    config["classify"] = dataclasses.replace(config["classify"], labels=data.labels)
    stored = run_config_to_dict(config)
    tokenizer = load_tokenizer((run_dir if resume else ckpt.run_dir_of(base)) / "tokenizer")
    run = check_run_dir(
        run_dir, stored, runtime, tokenizer, resume, overwrite, allow_config_change,
        lambda: ckpt.atomic_write_text(run_dir / SPLIT_FILE, json.dumps(split_summary(data)) + "\n"), log,
    )  # fmt: skip
    seed_everything(config["train"].seed)
    model = GPTClassifier(config["model"], len(data.labels), config["classify"].pooling)
    load_pretrained(model, base)
    set_trainable(model, config["classify"], config.get("lora"))
    model.to(runtime.device)
    max_length = token_limit(config["classify"].max_length, config["model"].context_length)
    labelled = {name: (encode_texts(tokenizer, split.texts, max_length), split.label_ids)
                for name, split in data.splits.items()}  # fmt: skip
    weights = None
    if config["classify"].balance == "class_weights":
        weights = class_weights(data.splits["train"].label_ids, len(data.labels))
    objective = ClassificationObjective(config["model"], labelled["train"], labelled["validation"], data.labels,
                                        config["train"], tokenizer.eot_id, weights, runtime.rank,
                                        runtime.world_size, trainable_parts(model))  # fmt: skip
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = ", ".join(f"{name} {len(split.texts)}" for name, split in data.splits.items())
    log(
        f"classifier over {', '.join(data.labels)} from {base}: {trainable_parameters:,} of "
        f"{model.num_parameters():,} parameters train ({config['classify'].trainable}); examples: {counts}"
    )
    save_weights = None
    if "lora" in config:
        from gptlab.lora import lora_state_dict

        save_weights = lora_state_dict
    result = train(
        model, objective, config["train"], run_dir, runtime, resume_from=run.resume_from, log=log,
        wrap_model=torch.compile if config["train"].compile else None, save_weights=save_weights, start_run=run.start,
    )  # fmt: skip

    model.eval()
    with runtime.autocast():
        reports = {name: predictions_report(objective.log_probs(model, runtime, labelled[name][0]), labelled[name][1],
                                            data.labels)
                   for name in ("validation", "test")}  # fmt: skip
    files = distributed.on_main(lambda: _write_reports(run_dir, result.step, reports), runtime)
    seconds = time.perf_counter() - started
    return ClassifyResult(run_dir, result, reports["test"], reports["validation"], trainable_parameters, seconds, files)
