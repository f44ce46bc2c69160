"""Instruction finetuning: Alpaca-style or chat records in a prompt template, a loss on the responses,
the seeded split, the run, and the model's responses to the test split.

A record becomes a few segments of text, each prompt or response (see `record_segments`). They are
tokenized one by one, the way generation sees them (the prompt encoded alone), and closed by
end-of-text, which the model learns to write when its response is done.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from gptlab import checkpoint as ckpt
from gptlab import distributed
from gptlab.config import (
    TASK_DEFAULTS,
    GenerationConfig,
    GPTConfig,
    InstructConfig,
    RecordsConfig,
    TrainConfig,
    finetuning_model_values,
)
from gptlab.errors import GptlabError
from gptlab.model import IGNORE_INDEX
from gptlab.sizing import ALL_TRAINS, Trainable, trainable_parts
from gptlab.templates import ROLES, Template, format_instruction, format_messages, get_template
from gptlab.train import RunDirectory, TrainResult

SPLITS = ("train", "validation", "test")
SPLIT_DIR = "data"  # the run's split: data/train.json, data/validation.json, data/test.json
RESPONSES_FILE = "test_responses.json"
SAMPLE_COUNT = 2  # validation instructions answered at each evaluation
T = TypeVar("T")

# ---------------------------------------------------------------- records


def resolve_source(source: str) -> Path:
    """The file behind a `source` field: a path, or a named data set (found or downloaded)."""
    from gptlab.download import dataset_path

    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.suffix or "/" in source:
        raise GptlabError(f"data file {path} not found; give a JSON or JSON lines file, or a named data set")
    return dataset_path(source)  # an unknown name is an error listing the known ones


def read_records(path: Path) -> list[Any]:
    """The records of a JSON file holding a list, or of a JSON lines file (`.jsonl`, one record a line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise GptlabError(f"{path} line {number} is not valid JSON ({exc})") from None
    else:
        try:
            records = json.loads(text) if text.strip() else []
        except ValueError as exc:
            raise GptlabError(f"{path} is not valid JSON ({exc}); JSON lines files must end in .jsonl") from None
        if not isinstance(records, list):
            raise GptlabError(f"{path} must hold a JSON list of records, got a {type(records).__name__}")
    if not records:
        raise GptlabError(f"{path} holds no records; give a JSON list of records or JSON lines, one record a line")
    return records


def check_record(record: Any, where: str) -> None:
    """Raise a one-line error when `record` is neither an Alpaca-style record nor a chat record."""
    if not isinstance(record, dict):
        raise GptlabError(f"{where} must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        _check_messages(record["messages"], where)
        return
    for key in ("instruction", "output"):
        if key not in record:
            raise GptlabError(
                f"{where} lacks {key!r}; records need 'instruction' and 'output' (and optional 'input'), "
                "or a list of chat 'messages'"
            )
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise GptlabError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise GptlabError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise GptlabError(f"{where}: message {i} needs a 'role' among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise GptlabError(f"{where}: message {i} needs a string 'content'")
        if message["role"] == "system" and i:
            raise GptlabError(f"{where}: a system message may only come first (message {i})")
    if messages[-1]["role"] != "assistant":
        raise GptlabError(f"{where}: the last message must be the assistant's reply to learn")
    if not any(m["role"] == "user" for m in messages):
        raise GptlabError(f"{where}: the messages hold no user turn")


def load_records(source: str) -> list[dict[str, Any]]:
    """The checked records of an instruction data file or named data set."""
    path = resolve_source(source)
    records = read_records(path)
    for i, record in enumerate(records):
        check_record(record, f"record {i} of {path}")
    return records


def split_records(
    records: Sequence[dict[str, Any]], fractions: Sequence[float], seed: int, section: str = "instruct"
) -> dict[str, list[dict[str, Any]]]:
    """Shuffle with `seed`, then cut into train, validation and test by `fractions`; no part may be empty."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = round(len(records) * fractions[1])
    n_test = round(len(records) * fractions[2])
    n_train = len(records) - n_val - n_test
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    empty = [name for name, size in sizes.items() if size < 1]
    if empty:
        raise GptlabError(
            f"{len(records)} records split by {list(fractions)} leave the {empty[0]} split empty; "
            f"give more records or change {section}.split"
        )
    bounds = np.cumsum([0, n_train, n_val, n_test])
    return {name: [records[i] for i in order[bounds[k] : bounds[k + 1]]] for k, name in enumerate(SPLITS)}


def write_split(run_dir: Path, split: dict[str, list[dict[str, Any]]]) -> None:
    for name, records in split.items():
        ckpt.atomic_write_text(run_dir / SPLIT_DIR / f"{name}.json", json.dumps(records, indent=1, ensure_ascii=False))


def read_split(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: read_records(run_dir / SPLIT_DIR / f"{name}.json") for name in SPLITS}


# ---------------------------------------------------------------- records as text and tokens


def record_segments(record: dict[str, Any], template: Template) -> list[tuple[str, bool]]:
    """The record's text as (segment, is_response) pairs, in order.

    An Alpaca record is its prompt, then its output. In a chat record every assistant message is a
    response; replies before the last keep the template's reply end, as `format_messages` writes them.
    """
    if "messages" not in record:
        prompt = format_instruction(template, record["instruction"], record.get("input", ""))
        return [(prompt, False), (record["output"], True)]
    messages = record["messages"]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # format_messages only appends as messages are added, so each prefix extends the last.
        text = format_messages(template, messages[: i + 1])
        start = len(text) - len(message["content"]) - len(template.reply_end)
        segments.append((text[len(done) : start], False))
        last = i == len(messages) - 1
        segments.append((message["content"] + ("" if last else template.reply_end), True))
        done = text
    return segments


def instruction_samples(instructions: Sequence[str], template: Template) -> list[str]:
    """`train.sample_prompts` as instructions in the run's template: what evaluations answer when given
    (otherwise validation instructions, whose reference answers are known)."""
    return [format_instruction(template, instruction) for instruction in instructions]


def prompt_and_reference(record: dict[str, Any], template: Template) -> tuple[str, str]:
    """The prompt that asks for the record's (last) response, and that response."""
    segments = record_segments(record, template)
    return "".join(text for text, _ in segments[:-1]), segments[-1][0]


@dataclass
class Example:
    """One tokenized record: prompt and response ids ending with end-of-text, and which ids are response."""

    ids: list[int]
    response: list[bool]


def encode_example(
    record: dict[str, Any], template: Template, tokenizer, max_length: int, last_response_only: bool = False
) -> Example:
    """The record's tokens, cut so that the model's input (all tokens but the last) fits `max_length`.

    With `last_response_only`, earlier replies of a chat record count as prompt (as preference pairs need:
    only the answer that differs is scored).
    """
    ids: list[int] = []
    response: list[bool] = []
    segments = record_segments(record, template)
    for i, (text, is_response) in enumerate(segments):
        piece = tokenizer.encode(text)
        ids += piece
        response += [is_response and (not last_response_only or i == len(segments) - 1)] * len(piece)
    ids.append(tokenizer.eot_id)
    response.append(True)
    return Example(ids[: max_length + 1], response[: max_length + 1])


def target_share(examples: Sequence[Example], mask_prompt: bool = True) -> float:
    """The share of the examples' input positions that have a target: only these reach the LM head."""
    inputs = sum(len(e.ids) - 1 for e in examples)
    return sum(sum(e.response[1:]) for e in examples) / max(1, inputs) if mask_prompt else 1.0


def has_response(example: Example) -> bool:
    """Whether truncation left the example a response token to learn (its first token is never a target)."""
    return any(example.response[1:])


def encode_learnable(
    split: dict[str, list[dict[str, Any]]],
    encode: Callable[[dict[str, Any]], T | None],
    names: Sequence[str],
    what: str,
    max_length: int,
    context_length: int,
    section: str,
) -> tuple[dict[str, list[T]], dict[str, list[dict[str, Any]]]]:
    """`encode` of every record of the splits `names`, without the records it gives None for (truncation to
    `max_length` left them nothing to learn): the encoded items and the records kept, split by split.
    With no training or validation item left, the run would learn nothing and report a perfect loss."""
    items, kept = {}, {}
    for name in names:
        encoded = [(record, encode(record)) for record in split[name]]
        kept[name] = [record for record, item in encoded if item is not None]
        items[name] = [item for _, item in encoded if item is not None]
    if not items["train"] or not items["validation"]:
        longer = f"raise {section}.max_length" if max_length < context_length else "start from a longer-context model"
        raise GptlabError(
            f"no training or validation {what} within {max_length} tokens; {longer} or shorten the prompts"
        )
    return items, kept


def collate(examples: Sequence[Example], eot_id: int, mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Inputs padded with end-of-text to the longest in the batch, targets shifted by one.

    Targets past each example's own end-of-text are IGNORE_INDEX, and with `mask_prompt` so are the
    prompt's: the loss is then on the response (and its closing end-of-text) only.
    """
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), eot_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.ids, dtype=torch.long)
        target = ids[1:].clone()
        if mask_prompt:
            target[~torch.tensor(example.response[1:])] = IGNORE_INDEX
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = target
    return {"input": inputs, "target": targets}


class ExampleBatches:
    """Batches of example indices, epoch after epoch, in an order fixed by (seed, epoch) for exact resume.

    With `bucketing`, each epoch's shuffled examples are sorted by length and cut into batches, whose
    order is shuffled: batches hold examples of similar length, so little of them is padding.
    Every batch is full; an epoch's leftover examples wait for a later epoch's shuffle. Under torchrun
    every rank holds the same order and takes its own batch of each group of `world_size` batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, bucketing: bool = False, rank: int = 0,
        world_size: int = 1,
    ):  # fmt: skip
        self.lengths = np.asarray(lengths)
        self.batch_size = min(batch_size, len(self.lengths))
        self.seed, self.bucketing = seed, bucketing
        self.rank, self.world_size = rank, world_size
        if len(self.lengths) // self.batch_size < world_size:
            raise GptlabError(
                f"{len(self.lengths)} training examples make fewer than one batch of {self.batch_size} for each of "
                f"{world_size} ranks; lower train.batch_size or use fewer ranks"
            )
        self.epoch, self.position = 0, 0
        self._epoch_cached, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        if self.bucketing:
            order = order[np.argsort(self.lengths[order], kind="stable")]
        full = len(order) - len(order) % self.batch_size
        batches = [order[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        if self.bucketing:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def next_indices(self) -> list[int]:
        """This rank's batch of the next `world_size` batches (an epoch's incomplete last group is skipped)."""
        if self.position + self.world_size > len(self._epoch(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._epoch(self.epoch)[self.position + self.rank].tolist()
        self.position += self.world_size
        return indices

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_cached != epoch:  # computed once per epoch, not once per batch
            self._batches, self._epoch_cached = self.epoch_batches(epoch), epoch
        return self._batches

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------- the objective


class RecordsObjective:
    """What the instruction and preference objectives share: batches in a seeded order (exact resume),
    and greedy responses to a few validation prompts as the samples of each evaluation."""

    def __init__(
        self,
        lengths: Sequence[int],
        rows_per_item: int,
        sample_prompts: Sequence[str],
        tokenizer,
        template: Template,
        model_config: GPTConfig,
        train_config: TrainConfig,
        records_config: RecordsConfig,
        rank: int = 0,
        world_size: int = 1,
        logit_share: float = 1.0,
        trainable: Trainable = ALL_TRAINS,
    ):
        """`lengths` are the training items' token counts; an item is `rows_per_item` rows of a batch;
        `logit_share` and `trainable` count the FLOPs of a step (`sizing.train_flops_per_token`)."""
        from gptlab.sizing import train_flops_per_token

        self.tokenizer, self.template = tokenizer, template
        self.batches = ExampleBatches(
            lengths, train_config.batch_size, train_config.seed, records_config.bucketing, rank, world_size
        )
        self.batch_size = train_config.batch_size
        self.eval_batches = train_config.eval_batches
        mean_length = max(1, round(np.mean(lengths) - 1))  # inputs are one token shorter than the example
        self.tokens_per_batch = rows_per_item * self.batches.batch_size * mean_length
        self.flops_per_token = train_flops_per_token(model_config, mean_length, logit_share, trainable)
        self.sample_prompts = list(sample_prompts)[:SAMPLE_COUNT]
        self.sample_tokens = train_config.sample_tokens

    def samples(self, model: torch.nn.Module, runtime) -> list[str]:
        if self.sample_tokens <= 0:
            return []
        responses = generate_responses(model, self.tokenizer, self.sample_prompts, self.template, self.sample_tokens)
        return [response for response, _ in responses]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])


class InstructionObjective(RecordsObjective):
    """Next-token loss on instruction examples; evaluation is the response-only validation loss."""

    def __init__(
        self,
        train_examples: Sequence[Example],
        val_examples: Sequence[Example],
        sample_prompts: Sequence[str],
        tokenizer,
        template: Template,
        model_config: GPTConfig,
        train_config: TrainConfig,
        instruct_config: InstructConfig,
        rank: int = 0,
        world_size: int = 1,
        trainable: Trainable = ALL_TRAINS,
    ):
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.mask_prompt = instruct_config.mask_prompt
        # Under torch.compile every row reaches the head (model.targeted_rows).
        logit_share = 1.0 if train_config.compile else target_share(self.train_examples, self.mask_prompt)
        super().__init__(
            [len(e.ids) for e in self.train_examples], 1, sample_prompts, tokenizer, template, model_config,
            train_config, instruct_config, rank, world_size, logit_share, trainable,
        )  # fmt: skip

    def next_batch(self) -> dict[str, torch.Tensor]:
        examples = [self.train_examples[i] for i in self.batches.next_indices()]
        return collate(examples, self.tokenizer.eot_id, self.mask_prompt)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input"], batch["target"])

    def evaluate(self, model: torch.nn.Module, runtime) -> dict[str, float]:
        """Loss per response token over (up to `eval_batches` batches of) the validation split, and its perplexity."""
        examples = self.val_examples[: self.eval_batches * self.batch_size]
        batches = [examples[start : start + self.batch_size] for start in range(0, len(examples), self.batch_size)]

        def sums(share: Sequence[Sequence[Example]]) -> torch.Tensor:
            """(summed loss, response tokens) of each batch."""
            rows = []
            for batch_examples in share:
                batch = runtime.to_device(collate(batch_examples, self.tokenizer.eot_id))
                tokens = (batch["target"] != IGNORE_INDEX).sum().double()
                rows.append(torch.stack([model(batch["input"], batch["target"]).double() * tokens, tokens]))
            return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)

        # Under torchrun each rank evaluates its share of the batches.
        total, count = distributed.spread_rows(sums, batches, runtime, distributed.is_sharded(model)).sum(0).tolist()
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}


# ---------------------------------------------------------------- responses


def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    template: Template,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[tuple[str, str]]:
    """Greedy response to each prompt, and how it ended: `end_of_text`, `stop_string` (the model began
    another turn of the template, which is cut off) or `length`."""
    from gptlab.generate import generate_ids

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    rows = generate_ids(model, tokenizer.encode_batch(list(prompts)), config, eot_id=tokenizer.eot_id)
    responses = []
    for row in rows:
        text = tokenizer.decode(row)
        cuts = [text.find(s) for s in template.stop if s in text]
        if cuts:
            responses.append((text[: min(cuts)].strip(), "stop_string"))
        else:
            responses.append((text.strip(), "end_of_text" if len(row) < max_new_tokens else "length"))
    return responses


def answer_records(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict[str, Any]],
    template: Template,
    max_new_tokens: int,
    runtime=None,
) -> list[dict[str, Any]]:
    """Each record with the model's `response` to its prompt and the response's `finish`.

    Given the `runtime` of a torchrun run, each rank answers its share of the records; a sharded
    (FSDP) model's ranks answer all of them, since every rank must run the same forward passes and
    the rows of different shares end after different numbers of steps."""

    def answer(share: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [prompt_and_reference(record, template)[0] for record in share]
        responses = generate_responses(model, tokenizer, prompts, template, max_new_tokens)
        return [
            {**record, "response": response, "finish": finish}
            for record, (response, finish) in zip(share, responses, strict=True)
        ]

    if runtime is None or distributed.is_sharded(model):
        return answer(records)
    return distributed.spread_items(answer, records, runtime)


# ---------------------------------------------------------------- the run


@dataclass
class InstructResult:
    """What an instruction finetuning run measured and wrote."""

    train: TrainResult
    run_dir: Path
    start_eval: dict[str, float]  # the response-only validation metrics before finetuning (empty on resume)
    final_eval: dict[str, float]
    responses_file: Path
    responses: list[dict[str, Any]] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0


def _with_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`values` over `defaults`, section by section (a section's unset fields keep their defaults)."""
    merged = {**defaults, **values}
    for name, section in defaults.items():
        if isinstance(section, dict):
            merged[name] = {**section, **(values.get(name) or {})}
    return merged


def _base_model_values(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the model shape of its base run and `init_from` as an absolute checkpoint folder
    (a LoRA run's adapters are laid over exactly these weights, even if the base run trains on); a run
    without a template of its own takes its base run's, else alpaca."""
    if not values.get("init_from"):
        raise GptlabError("finetuning starts from a trained model; pass --init-from RUN_OR_CHECKPOINT")
    base = ckpt.find_checkpoint(values["init_from"])
    base_config = ckpt.read_run_config(ckpt.run_dir_of(base))
    if base_config.get("lora"):
        raise GptlabError(f"base run {base} is a LoRA run; merge it first with `gptlab lora merge`")
    model = finetuning_model_values(base_config["model"], values.get("model"), str(base))
    rest = {k: v for k, v in values.items() if k != "preset"}
    template = values.get("template") or base_config.get("template") or "alpaca"
    return {**rest, "init_from": str(base.resolve()), "model": model, "template": template}


def resolve_records_config(
    values: dict[str, Any],
    resume: bool,
    section: str = "instruct",
    defaults: dict[str, Any] = TASK_DEFAULTS["instruct"],
) -> dict[str, Any]:
    """The validated config of an instruction (or preference) run: defaults (for a new run), the base run's
    model shape, the sections as dataclasses; `lora` only when adapters train, checked against the context."""
    from gptlab.config import check_task, resolve_run_config
    from gptlab.train import validate_train_config

    if not resume:  # a resumed run's task is checked against the run (check_resumed_task)
        check_task(values, defaults["task"])
    values = _base_model_values(values if resume else _with_defaults(values, defaults))
    config = resolve_run_config(values, ["model", "train", section, "lora"])
    validate_train_config(config["train"])  # before the data, the reference and the first evaluation
    if config[section].trainable != "lora":
        del config["lora"]
    get_template(config["template"])  # an unknown name fails here, before anything is written
    context = config["model"].context_length
    if config[section].max_length > context:
        raise GptlabError(
            f"{section}.max_length {config[section].max_length} exceeds the model's context length {context}"
        )
    return config


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """The base run's model with its weights, wrapped with adapters (the rest frozen) for LoRA."""
    from gptlab.lora import apply_lora
    from gptlab.model import GPT
    from gptlab.train import init_weights_from, seed_everything

    seed_everything(config["train"].seed)
    model = GPT(config["model"])
    init_weights_from(model, config["init_from"])
    if "lora" in config:
        apply_lora(model, config["lora"])
    return model


def train_from_start(
    model: torch.nn.Module,
    objective: RecordsObjective,
    config: dict[str, Any],
    run: RunDirectory,
    runtime,
    log: Callable[[str], None],
    write_files: Callable[[], None] | None = None,
) -> tuple[dict[str, float], TrainResult]:
    """Evaluate the starting model (a fresh run's step 0 of the curves), then train it in the one loop
    (compiled with `train.compile`, checkpoints holding only the adapters under LoRA). Once the loop
    has started the run directory, rank 0 writes the step-0 metrics and `write_files()` into it.

    Returns the starting evaluation (empty on resume) and the loop's result."""
    from gptlab.lora import lora_state_dict
    from gptlab.train import METRICS_FILE, MetricsLog, train

    start_eval: dict[str, float] = {}
    if run.resume_from is None:
        with torch.no_grad(), runtime.autocast():
            start_eval = objective.evaluate(model.eval(), runtime)
        log("before training: " + " | ".join(f"{k} {v:.4f}" for k, v in start_eval.items()))

    def start_run() -> None:
        run.start()
        if start_eval:
            MetricsLog(run.path / METRICS_FILE).append({"step": 0, "split": "val", "tokens": 0, **start_eval})
        if write_files is not None:
            write_files()

    result = train(
        model, objective, config["train"], run.path, runtime, resume_from=run.resume_from, log=log,
        wrap_model=torch.compile if config["train"].compile else None,
        save_weights=lora_state_dict if "lora" in config else None, start_run=start_run,
    )  # fmt: skip
    return start_eval, result


def _answered_example(
    record: dict[str, Any], template: Template, tokenizer, max_length: int, mask_prompt: bool = True
) -> Example | None:
    """The record's example, or None when truncation to `max_length` left it nothing to learn: no response
    token (with `mask_prompt`; without, every token after the first is a target)."""
    example = encode_example(record, template, tokenizer, max_length)
    learnable = has_response(example) if mask_prompt else len(example.ids) > 1
    return example if learnable else None


def finetune_instruct(
    values: dict[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> InstructResult:
    """Finetune the `init_from` model on instruction records as the run config `values` describes.

    Writes the split to the run, trains (adapters only with `instruct.trainable: lora`), then writes the
    model's responses to the test split to `test_responses.json` in the run directory.
    """
    from gptlab.config import run_config_to_dict
    from gptlab.lora import count_trainable
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train import check_resumed_task, check_run_dir, make_runtime

    if resume:
        check_resumed_task(values["out_dir"], "instruct")
    config = resolve_records_config(values, resume)
    template, instruct = get_template(config["template"]), config["instruct"]
    run_dir = Path(config["out_dir"])
    tokenizer = load_tokenizer((run_dir if resume else ckpt.run_dir_of(Path(config["init_from"]))) / "tokenizer")
    split = read_split(run_dir) if resume else split_records(load_records(instruct.source), instruct.split, instruct.split_seed)  # fmt: skip
    runtime = make_runtime(config["train"])
    model = build_model(config).to(runtime.device)
    trainable, total = count_trainable(model)

    stored = run_config_to_dict(config)
    run = check_run_dir(
        run_dir, stored, runtime, tokenizer, resume, overwrite, allow_config_change, lambda: write_split(run_dir, split),
        log,
    )  # fmt: skip
    max_length = instruct.max_length or config["model"].context_length
    examples, kept = encode_learnable(
        split, lambda record: _answered_example(record, template, tokenizer, max_length, instruct.mask_prompt),
        ("train", "validation"),
        "record keeps a response token", max_length, config["model"].context_length, "instruct",
    )  # fmt: skip
    left_out = sum(len(split[name]) - len(kept[name]) for name in kept)
    log(
        f"instruction data: {', '.join(f'{len(split[n])} {n}' for n in SPLITS)} records in the {template.name} template"
        f"{f' ({left_out} without a response token within {max_length} tokens left out)' if left_out else ''}; "
        f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.2%}){' (LoRA)' if 'lora' in config else ''} "
        f"on {runtime.device}"
    )
    sample_prompts = instruction_samples(config["train"].sample_prompts, template) or [
        prompt_and_reference(r, template)[0] for r in kept["validation"]
    ]
    objective = InstructionObjective(
        examples["train"], examples["validation"], sample_prompts, tokenizer, template, config["model"],
        config["train"], instruct, runtime.rank, runtime.world_size, trainable_parts(model),
    )  # fmt: skip

    start_eval, result = train_from_start(model, objective, config, run, runtime, log)

    model.eval()
    with runtime.autocast():
        responses = answer_records(model, tokenizer, split["test"], template, instruct.response_tokens, runtime)
    responses_file = run_dir / RESPONSES_FILE
    if runtime.is_main:
        ckpt.atomic_write_text(responses_file, json.dumps(responses, indent=1, ensure_ascii=False))
    return InstructResult(
        train=result, run_dir=run_dir, start_eval=start_eval, final_eval=result.last_eval,
        responses_file=responses_file, responses=responses, trainable_parameters=trainable, total_parameters=total,
    )  # fmt: skip
