"""Preference tuning with DPO (Direct Preference Optimization, Rafailov et al., 2023).

Each record is a prompt with a `chosen` and a `rejected` response. The model (the policy) learns to
raise the chosen response's probability relative to the rejected one's, measured against a frozen
reference: the model the run starts from. With log-probabilities summed over each response's tokens,

    loss = -log sigmoid(beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)))

and beta * (policy - reference) is a response's implicit reward. No reward model and no sampling:
the reference's log-probabilities are computed once, before the first step, and kept in the run
(`data/reference_logps.json`), so no second model is held in memory while training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptlab import checkpoint as ckpt
from gptlab import distributed
from gptlab.config import TASK_DEFAULTS, GPTConfig, PreferenceConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.instruct import (
    SPLIT_DIR,
    SPLITS,
    Example,
    RecordsObjective,
    answer_records,
    build_model,
    check_record,
    collate,
    encode_example,
    encode_learnable,
    has_response,
    instruction_samples,
    prompt_and_reference,
    read_records,
    read_split,
    resolve_records_config,
    resolve_source,
    split_records,
    target_share,
    train_from_start,
    write_split,
)
from gptlab.sizing import ALL_TRAINS, Trainable, trainable_parts
from gptlab.templates import Template, get_template
from gptlab.train import TrainResult

REFERENCE_FILE = "reference_logps.json"  # in the run's data/ folder, beside the split
RESPONSES_FILE = "test_responses.json"

# ---------------------------------------------------------------- records


def with_response(record: dict[str, Any], response: str) -> dict[str, Any]:
    """The instruction record a preference record makes with one of its responses as the answer."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):  # left as it is, for check_record to name the problem
            return {"messages": messages}
        return {"messages": [*messages, {"role": "assistant", "content": response}]}
    return {**{k: v for k, v in record.items() if k in ("instruction", "input")}, "output": response}


def check_preference_record(record: Any, where: str) -> None:
    """Raise a one-line error unless `record` is a prompt (Alpaca-style, or chat messages ending with the
    user's turn) with string `chosen` and `rejected` responses."""
    if not isinstance(record, dict):
        raise GptlabError(f"{where} must be a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise GptlabError(
                f"{where} lacks {key!r}; preference records need a prompt ('instruction' and optional 'input', "
                "or chat 'messages') with 'chosen' and 'rejected' responses"
            )
        if not isinstance(record[key], str):
            raise GptlabError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        if messages[-1].get("role") == "assistant":
            raise GptlabError(f"{where}: the messages must end with the user's turn; the responses are chosen/rejected")
    check_record(with_response(record, record["chosen"]), where)


def load_preference_records(source: str) -> tuple[list[dict[str, Any]], int]:
    """The checked records of a preference data file or named data set, and how many were left out
    because their two responses are the same (they carry no preference)."""
    path = resolve_source(source)
    records = read_records(path)
    for i, record in enumerate(records):
        check_preference_record(record, f"record {i} of {path}")
    kept = [r for r in records if r["chosen"] != r["rejected"]]
    if not kept:
        raise GptlabError(f"every record of {path} has the same chosen and rejected response; nothing to prefer")
    return kept, len(records) - len(kept)


# ---------------------------------------------------------------- pairs as tokens


@dataclass
class Pair:
    """One tokenized preference record: the prompt with the chosen response, and with the rejected one."""

    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        return max(len(self.chosen.ids), len(self.rejected.ids))


def encode_pair(record: dict[str, Any], template: Template, tokenizer, max_length: int) -> Pair | None:
    """The record's two examples, the final answer alone counting as response; None when truncation to
    `max_length` leaves either without an answer token or cuts both answers to the same tokens."""
    chosen, rejected = (
        encode_example(with_response(record, record[key]), template, tokenizer, max_length, last_response_only=True)
        for key in ("chosen", "rejected")
    )
    if not has_response(chosen) or not has_response(rejected) or chosen.ids == rejected.ids:
        return None
    return Pair(chosen, rejected)


def collate_pairs(pairs: Sequence[Pair], eot_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the chosen examples then the rejected ones, with response-only targets."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], eot_id, mask_prompt=True)


def response_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of each pair's responses, (B, 2): chosen, rejected."""
    per_token = model(batch["input"], batch["target"], reduction="none")  # (2B, T), 0 off the response
    return -per_token.sum(1).view(2, -1).t()


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean DPO loss over pairs and the implicit rewards (B, 2), from log-probabilities (B, 2).

    With `label_smoothing` e, a share e of the labels is taken to be flipped (conservative DPO):
    the loss is (1 - e) times DPO's plus e times DPO's with chosen and rejected swapped.
    """
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss.mean(), rewards.detach()


def pair_log_probs(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    eot_id: int,
    batch_size: int,
    runtime,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Summed response log-probabilities (n, 2) of every pair under `model`, without gradients."""
    out = []
    with torch.no_grad(), runtime.autocast():
        for start in range(0, len(pairs), batch_size):
            batch = runtime.to_device(collate_pairs(pairs[start : start + batch_size], eot_id))
            out.append(response_log_probs(model, batch).float().cpu())
            if progress is not None:
                progress(min(start + batch_size, len(pairs)), len(pairs))
    return torch.cat(out) if out else torch.zeros(0, 2)


def preference_metrics(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> dict[str, float]:
    """DPO loss, reward accuracy (share of pairs whose chosen reward is the higher), mean margin and rewards."""
    loss, rewards = dpo_loss(policy, reference, beta, label_smoothing)
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "dpo_loss": loss.item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
        "chosen_reward": rewards[:, 0].mean().item(),
        "rejected_reward": rewards[:, 1].mean().item(),
    }


# ---------------------------------------------------------------- the objective


class PreferenceObjective(RecordsObjective):
    """DPO on preference pairs; evaluation is the DPO loss and reward accuracy on the validation split."""

    def __init__(
        self,
        train_pairs: Sequence[Pair],
        val_pairs: Sequence[Pair],
        reference: dict[str, torch.Tensor],
        sample_prompts: Sequence[str],
        tokenizer,
        template: Template,
        model_config: GPTConfig,
        train_config: TrainConfig,
        preference_config: PreferenceConfig,
        rank: int = 0,
        world_size: int = 1,
        trainable: Trainable = ALL_TRAINS,
    ):
        self.train_pairs, self.val_pairs = list(train_pairs), list(val_pairs)
        self.reference = reference
        self.beta, self.label_smoothing = preference_config.beta, preference_config.label_smoothing
        super().__init__(
            [p.length for p in self.train_pairs], 2, sample_prompts, tokenizer, template, model_config,
            train_config, preference_config, rank, world_size,
            target_share([e for p in self.train_pairs for e in (p.chosen, p.rejected)]), trainable,
        )  # fmt: skip
        self.eval_pairs = self.eval_batches * self.batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self.batches.next_indices()
        batch = collate_pairs([self.train_pairs[i] for i in indices], self.tokenizer.eot_id)
        return {**batch, "reference": self.reference["train"][indices]}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return dpo_loss(response_log_probs(model, batch), batch["reference"], self.beta, self.label_smoothing)[0]

    def metrics(self, model: torch.nn.Module, runtime, split: str, pairs: Sequence[Pair]) -> dict[str, float]:
        """The DPO metrics of `pairs` (the first of `split`'s) under `model`; empty for no pairs."""
        if not pairs:
            return {}
        policy = distributed.spread_rows(  # under torchrun each rank scores its share of the pairs
            lambda share: pair_log_probs(model, share, self.tokenizer.eot_id, self.batch_size, runtime),
            pairs,
            runtime,
            distributed.is_sharded(model),
        )
        return preference_metrics(policy, self.reference[split][: len(pairs)], self.beta, self.label_smoothing)

    def evaluate(self, model: torch.nn.Module, runtime) -> dict[str, float]:
        metrics = self.metrics(model, runtime, "validation", self.val_pairs[: self.eval_pairs])
        return {"val_loss": metrics.pop("dpo_loss"), **metrics}


# ---------------------------------------------------------------- the reference


def pairs_fingerprint(pairs: dict[str, list[Pair]]) -> str:
    """A hash of every split's tokens and answer masks: the stored reference belongs to exactly these pairs."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for pair in pairs[name]:
            for example in (pair.chosen, pair.rejected):
                digest.update(json.dumps([example.ids, example.response]).encode())
        digest.update(name.encode())
    return digest.hexdigest()


def reference_log_probs(
    model: torch.nn.Module,
    pairs: dict[str, list[Pair]],
    run_dir: Path,
    resume: bool,
    tokenizer,
    batch_size: int,
    runtime,
    log: Callable[[str], None],
) -> dict[str, torch.Tensor]:
    """The reference's log-probabilities of every split's pairs: read from a resumed run, or computed
    with `model` (the starting weights). `write_reference` stores them in the run."""
    path = run_dir / SPLIT_DIR / REFERENCE_FILE
    fingerprint = pairs_fingerprint(pairs)
    # Only a resumed run's file is its own: the directory of a new run may still hold the run it replaces.
    if resume and path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("fingerprint") == fingerprint:
            return {name: torch.tensor(stored[name], dtype=torch.float32).view(-1, 2) for name in SPLITS}
        log(f"{path} was computed for other pairs (the template or max_length changed?); computing it again")
    started = time.perf_counter()
    every = 20 * batch_size

    def progress(count: int, total: int) -> None:
        if runtime.is_main and (count % every < batch_size or count == total):
            share = " (rank 0's share)" if runtime.world_size > 1 else ""
            log(f"reference log-probabilities: {count}/{total} pairs{share}")

    model.eval()
    in_order = [pair for name in SPLITS for pair in pairs[name]]  # one pass, the splits laid end to end
    # Under torchrun each rank scores its share (the model is not wrapped yet) and all get every row.
    computed = distributed.spread_rows(
        lambda share: pair_log_probs(model, share, tokenizer.eot_id, batch_size, runtime, progress), in_order, runtime
    )
    model.train()
    reference = dict(zip(SPLITS, computed.split([len(pairs[name]) for name in SPLITS]), strict=True))
    total = len(in_order)
    ranks = f" over {runtime.world_size} ranks" if runtime.world_size > 1 else ""
    log(f"reference log-probabilities of {total} pairs{ranks} in {time.perf_counter() - started:.1f} s")
    return reference


def write_reference(run_dir: Path, pairs: dict[str, list[Pair]], reference: dict[str, torch.Tensor]) -> None:
    """Store the reference's log-probabilities in the run, with the fingerprint of the pairs they belong to."""
    stored = {"fingerprint": pairs_fingerprint(pairs), **{name: reference[name].tolist() for name in SPLITS}}
    ckpt.atomic_write_text(run_dir / SPLIT_DIR / REFERENCE_FILE, json.dumps(stored))


# ---------------------------------------------------------------- the run


@dataclass
class PreferenceResult:
    """What a preference tuning run measured and wrote."""

    train: TrainResult
    run_dir: Path
    start_eval: dict[str, float]  # validation metrics before tuning (empty on resume)
    final_eval: dict[str, float]
    test_metrics: dict[str, float]
    responses_file: Path
    responses: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # pairs left out, and why
    trainable_parameters: int = 0
    total_parameters: int = 0


def finetune_preference(
    values: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> PreferenceResult:
    """Tune the `init_from` model on preference pairs with DPO as the run config `values` describes.

    Writes the split and the reference's log-probabilities to the run, trains (adapters only with
    `preference.trainable: lora`), then writes the tuned model's responses to the test split to
    `test_responses.json` (with the chosen response as the reference answer, for `gptlab eval judge`).
    """
    from gptlab.config import run_config_to_dict
    from gptlab.lora import count_trainable
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train import check_resumed_task, check_run_dir, make_runtime

    if resume:
        check_resumed_task(values["out_dir"], "preference")
    config = resolve_records_config(values, resume, "preference", TASK_DEFAULTS["preference"])
    template, preference = get_template(config["template"]), config["preference"]
    run_dir = Path(config["out_dir"])
    tokenizer = load_tokenizer((run_dir if resume else ckpt.run_dir_of(Path(config["init_from"]))) / "tokenizer")
    skipped = {"same_responses": 0, "truncated": 0}
    if resume:
        split = read_split(run_dir)
    else:
        records, skipped["same_responses"] = load_preference_records(preference.source)
        split = split_records(records, preference.split, preference.split_seed, preference.SECTION)
    runtime = make_runtime(config["train"])
    model = build_model(config).to(runtime.device)
    trainable, total = count_trainable(model)
    run = check_run_dir(
        run_dir, run_config_to_dict(config), runtime, tokenizer, resume, overwrite, allow_config_change,
        lambda: write_split(run_dir, split), log,
    )  # fmt: skip

    max_length = preference.max_length or config["model"].context_length
    pairs, kept = encode_learnable(
        split, lambda record: encode_pair(record, template, tokenizer, max_length), SPLITS,
        "pair keeps two different answers", max_length, config["model"].context_length, "preference",
    )  # fmt: skip
    skipped["truncated"] = sum(len(split[name]) - len(kept[name]) for name in SPLITS)
    log(
        f"preference data: {', '.join(f'{len(pairs[n])} {n}' for n in SPLITS)} pairs in the {template.name} template"
        f"{_skipped_text(skipped)}; {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})"
        f"{' (LoRA)' if 'lora' in config else ''} on {runtime.device}; beta {preference.beta}"
    )
    batch_size = config["train"].batch_size
    reference = reference_log_probs(model, pairs, run_dir, resume, tokenizer, batch_size, runtime, log)
    sample_prompts = instruction_samples(config["train"].sample_prompts, template) or [
        prompt_and_reference(with_response(r, r["chosen"]), template)[0] for r in kept["validation"]
    ]
    objective = PreferenceObjective(
        pairs["train"], pairs["validation"], reference, sample_prompts, tokenizer, template, config["model"],
        config["train"], preference, runtime.rank, runtime.world_size, trainable_parts(model),
    )  # fmt: skip

    # At step 0 the policy is the reference: DPO loss log 2, every reward 0.
    start_eval, result = train_from_start(
        model, objective, config, run, runtime, log, lambda: write_reference(run_dir, pairs, reference)
    )

    model.eval()
    test_metrics = objective.metrics(model, runtime, "test", pairs["test"])
    responses: list[dict[str, Any]] = []
    if kept["test"]:
        with runtime.autocast():
            answers = [with_response(r, r["chosen"]) for r in kept["test"]]
            answered = answer_records(model, tokenizer, answers, template, preference.response_tokens, runtime)
        responses = [{**record, **answer} for record, answer in zip(kept["test"], answered, strict=True)]
    responses_file = run_dir / RESPONSES_FILE
    if runtime.is_main:
        ckpt.atomic_write_text(responses_file, json.dumps(responses, indent=1, ensure_ascii=False))
        ckpt.atomic_write_text(run_dir / "test_metrics.json", json.dumps(test_metrics, indent=1))
    return PreferenceResult(
        train=result, run_dir=run_dir, start_eval=start_eval, final_eval=result.last_eval, test_metrics=test_metrics,
        responses_file=responses_file, responses=responses, skipped=skipped, trainable_parameters=trainable,
        total_parameters=total,
    )  # fmt: skip


def _skipped_text(skipped: dict[str, int]) -> str:
    parts = []
    if skipped["same_responses"]:
        parts.append(f"{skipped['same_responses']} with the same chosen and rejected response")
    if skipped["truncated"]:
        parts.append(f"{skipped['truncated']} without two different answers after truncation")
    return f" ({'; '.join(parts)} left out)" if parts else ""
