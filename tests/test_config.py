"""Run configs: values from config files are checked and converted like command-line values."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import yaml

from gptlab.checkpoint import read_run_config, save_checkpoint, write_run_config
from gptlab.cli import build_parser, collect_config, main
from gptlab.config import (
    GenerationConfig,
    GPTConfig,
    TrainConfig,
    check_run_values,
    parse_value,
    resolve_run_config,
)
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizer import ByteTokenizer

TINY = GPTConfig(vocab_size=257, context_length=16, n_layer=1, n_head=2, n_embd=16)
# A few steps of a tiny model on a short text: enough to write a run directory.
TINY_TRAINING = {"max_steps": 2, "batch_size": 2, "eval_interval": 2, "eval_batches": 1, "sample_tokens": 2,
                 "peak_flops": 1e11, "device": "cpu", "threads": 1}  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {max_steps: 3.7}", "invalid value 3.7 for train.max_steps in {file}: it must be a whole number"),
        ("train: {max_steps: '3x'}", "invalid value '3x' for train.max_steps in {file}: it must be a whole number"),
        ("train: {max_steps: true}", "invalid value True for train.max_steps in {file}: it must be a whole number"),
        ("train: {compile: maybe}", "invalid value 'maybe' for train.compile in {file}: it must be true or false"),
        ("model: {dropout: .nan}", "invalid value nan for model.dropout in {file}: it must be a finite number"),
        ("train: {sample_prompts: {a: 1}}", "for train.sample_prompts in {file}: it must be a list of texts"),
        ("classify: {labels: [yes, no]}", "invalid value [True, False] for classify.labels in {file}"),
        ("train: [1, 2]", "config section 'train' in {file} must be a mapping of fields, got [1, 2]"),
        ("train: {max_stepz: 3}", "unknown config field train.max_stepz in {file} (did you mean 'max_steps'?)"),
        ("trian: {max_steps: 3}", "unknown config field trian in {file} (did you mean 'train'?)"),
        ("preset: 5", "unknown model preset '5'"),
        ("preset: [gpt2]", "invalid value ['gpt2'] for preset in {file}: it must be text or none"),
    ],
)
def test_a_wrong_value_in_a_config_file_is_a_one_line_error_naming_field_file_value_and_type(
    text, message, tmp_path, capsys
):
    config = tmp_path / "recipe.yaml"
    config.write_text(text + "\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(file=config) in err
    assert not (tmp_path / "run").exists()


def test_config_file_text_is_read_as_the_command_line_reads_it():
    values = {
        "train": {"max_steps": "3", "learning_rate": "1e-3", "compile": "false", "sample_prompts": "The",
                  "tokens_per_step": "none", "beta2": 1},
        "data": {"stride": None},
        "classify": {"labels": [0, 1], "split": ["0.5", 0.25, 0.25]},
    }  # fmt: skip
    checked = check_run_values(values, "recipe.yaml")
    assert checked["train"] == {"max_steps": 3, "learning_rate": 1e-3, "compile": False, "sample_prompts": ["The"],
                                "tokens_per_step": None, "beta2": 1.0}  # fmt: skip
    assert checked["data"] == {"stride": None}
    assert checked["classify"] == {"labels": ["0", "1"], "split": [0.5, 0.25, 0.25]}
    # YAML reads 1e-3 (no dot) as text, and 1.0e-3 as a float: both are the float.
    assert yaml.safe_load("learning_rate: 1e-3")["learning_rate"] == "1e-3"
    for text in ("The", "The,Once upon"):
        from_file = check_run_values({"train": {"sample_prompts": text}})["train"]["sample_prompts"]
        assert from_file == parse_value(TrainConfig, "sample_prompts", text)
    for text in ("yes", "no", "on", "0"):
        from_file = check_run_values({"train": {"compile": text}})["train"]["compile"]
        assert from_file is parse_value(TrainConfig, "compile", text) is (text in ("yes", "on"))


def test_values_given_to_the_library_are_checked_too():
    with pytest.raises(GptlabError, match="invalid value 3.7 for train.max_steps: it must be a whole number"):
        resolve_run_config({"train": {"max_steps": 3.7}}, ["train"])
    with pytest.raises(GptlabError, match="config section 'train' must be a mapping"):
        resolve_run_config({"train": [1, 2]}, ["train"])
    assert resolve_run_config({"train": None}, ["train"])["train"] == TrainConfig()


@pytest.mark.parametrize("fields", [dict(temperature=float("nan")), dict(repetition_penalty=float("inf"))])
def test_generation_config_refuses_values_that_are_not_finite(fields):
    with pytest.raises(GptlabError, match="finite"):
        GenerationConfig(**fields)


def test_a_recipe_with_values_written_as_text_trains(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    config = tmp_path / "recipe.yaml"
    values = {
        "preset": None, "model": asdict(TINY),
        "data": {"source": str(tmp_path / "corpus.txt"), "tokenizer": "byte"},
        "train": {**TINY_TRAINING, "max_steps": "2", "sample_prompts": "The", "compile": "false"},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(values) + "  learning_rate: 1e-3\n")  # as a person writes it: text to YAML
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    train = read_run_config(tmp_path / "run")["train"]
    assert (train["max_steps"], train["learning_rate"], train["sample_prompts"], train["compile"]) == (
        2, 1e-3, ["The"], False
    )  # fmt: skip
    assert (tmp_path / "run" / "latest").is_file()


@pytest.mark.parametrize("action", ["classify", "instruct", "preference"])
def test_finetune_commands_take_the_model_dropout_and_no_other_model_field(action):
    parser = build_parser()
    args, unknown = parser.parse_known_args(["finetune", action, "--model.dropout", "0.1"])
    assert not unknown and collect_config(args)[0]["model"] == {"dropout": 0.1}
    _, unknown = parser.parse_known_args(["finetune", action, "--model.n_layer", "2"])
    assert unknown == ["--model.n_layer", "2"]  # it would not fit the weights of the run finetuned


def test_finetuned_classifier_takes_the_dropout_given(tmp_path, capsys):
    torch.manual_seed(0)
    base = tmp_path / "base"
    write_run_config(base, {"task": "pretrain", "model": asdict(TINY)})
    ByteTokenizer().save(base / "tokenizer")
    save_checkpoint(base, 0, GPT(TINY).state_dict(), {})
    rows = [f"{label}\t{text}" for label, text in [("ham", "see you soon"), ("spam", "WIN CASH NOW")] * 10]
    (tmp_path / "data.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n")
    tiny = [f"--train.{name}={value}" for name, value in TINY_TRAINING.items()]
    argv = ["finetune", "classify", "--init-from", str(base), "--out", str(tmp_path / "run"), "--model.dropout", "0.2"]
    assert main([*argv, "--classify.source", str(tmp_path / "data.tsv"), *tiny]) == 0
    assert read_run_config(tmp_path / "run")["model"] == asdict(TINY) | {"dropout": 0.2}


def test_a_finetuning_run_keeps_its_base_models_shape_and_may_change_dropout():
    from gptlab.config import finetuning_model_values

    base = {"n_layer": 2, "n_embd": 32, "dropout": 0.0}
    assert finetuning_model_values(base, {"dropout": 0.2, "n_layer": 2}, "base") == {**base, "dropout": 0.2}
    assert finetuning_model_values(base, None, "base") == base
    with pytest.raises(GptlabError, match="model.n_embd is 64 but 32 in the base run base"):
        finetuning_model_values(base, {"n_embd": 64}, "base")
