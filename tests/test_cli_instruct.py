import json

import pytest

from conftest import run_torchrun
from gptlab.checkpoint import WEIGHTS_FILE, find_checkpoint, load_weights, read_run_config
from gptlab.cli import main
from gptlab.templates import format_instruction
from test_instruct import base_run, word_records
from test_judge import judge_server

FAST = ["--train.max_steps", "4", "--train.batch_size", "4", "--train.eval_interval", "4", "--train.eval_batches", "1",
        "--train.peak_flops", "1e11", "--train.threads", "1", "--train.sample_tokens", "4",
        "--instruct.response_tokens", "8"]  # fmt: skip


def finetune_args(tmp_path, records=None, *extra):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records if records is not None else word_records()))
    base = base_run(tmp_path)
    return ["finetune", "instruct", "--init-from", str(base), "--out", str(tmp_path / "run"), "--template", "chat",
            "--instruct.source", str(data), *FAST, *extra]  # fmt: skip


def test_finetune_instruct_then_judge_its_test_responses(tmp_path, capsys):
    assert main(finetune_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "response-only validation loss: " in out and " -> " in out
    assert f"test responses: 3 in {tmp_path / 'run' / 'test_responses.json'}" in out
    assert read_run_config(tmp_path / "run")["template"] == "chat"

    # generate: a plain continuation unless asked for the run's template, with a hint on stderr
    common = ["generate", str(tmp_path / "run"), "Name a colour", "--json", "--greedy", "--max-new-tokens", "4"]
    assert main(common) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["prompt"] == "Name a colour" and "--template run" in captured.err
    assert main([*common, "--template", "run"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == format_instruction("chat", "Name a colour")
    assert main([*common, "--template", "alpacca"]) == 2
    assert "unknown prompt template 'alpacca' (did you mean 'alpaca'?)" in capsys.readouterr().err

    with judge_server() as server:
        assert main(["eval", "judge", str(tmp_path / "run"), "--endpoint", server.url, "--model", "judge-1"]) == 0
    out = capsys.readouterr().out
    assert "mean score: " in out and "over 3 responses (judge-1)" in out
    assert len(server.requests) == 3 and (tmp_path / "run" / "judge_scores.png").is_file()
    scores = json.loads((tmp_path / "run" / "judge_scores.json").read_text())
    assert len(scores["entries"]) == 3 and all(e["score"] in (25, 100) for e in scores["entries"])


def test_lora_flag_trains_adapters_only(tmp_path, capsys):
    assert main(finetune_args(tmp_path, None, "--lora", "--lora.rank", "2", "--lora.targets", "attn.qkv")) == 0
    config = read_run_config(tmp_path / "run")
    assert config["instruct"]["trainable"] == "lora" and config["lora"]["rank"] == 2
    weights = load_weights(find_checkpoint(tmp_path / "run") / WEIGHTS_FILE)
    assert sorted(weights) == [f"blocks.{i}.attn.qkv.lora_{m}" for i in (0, 1) for m in "AB"]
    assert "(LoRA)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "records, extra, message",
    [
        (None, ["--template", "alpacca"], "unknown prompt template 'alpacca' (did you mean 'alpaca'?)"),
        ([{"instruction": "a"}] * 20, [], "lacks 'output'"),
        ([{"instruction": 1, "output": "b"}] * 20, [], "'instruction' must be a string, got int"),
        ([], [], "holds no records"),
        (None, ["--lora", "--lora.targets", "mlp.fcc"], "LoRA target 'mlp.fcc' matches no linear layer"),
        (None, ["--instruct.trainable", "some"], "instruct.trainable must be all or lora"),
        (None, ["--instruct.max_length", "3"], "no training or validation record keeps a response token within 3"),
        (None, ["--train.batch_size", "0"], "train.batch_size must be positive, got 0"),
        (None, ["--task", "pretrain"], "the config's task is pretrain, but this command trains instruct runs"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, records, extra, message):
    assert main(finetune_args(tmp_path, records, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_resuming_a_finished_run_reports_it(tmp_path, capsys):
    assert main(finetune_args(tmp_path)) == 0
    capsys.readouterr()
    assert main(["finetune", "instruct", "--resume", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "test responses: 3 in " in out


def test_eval_judge_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "test_responses.json").write_text(json.dumps([{"instruction": "a", "output": "b", "response": "b"}]))
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    cases = [
        ([str(tmp_path / "missing")], "not found"),
        ([str(tmp_path), "--api-key-env", "JUDGE_KEY"], "environment variable JUDGE_KEY is not set"),
        ([str(tmp_path), "--limit", "0"], "--limit must be at least 1"),
    ]
    for args, message in cases:
        assert main(["eval", "judge", *args, "--endpoint", "http://127.0.0.1:9", "--model", "m"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_torchrun_finetunes_with_each_rank_on_its_own_batches(tmp_path):
    """Two gloo ranks share one run: set up, logged and written by rank 0 only."""
    args = finetune_args(tmp_path, None, "--train.device", "cpu", "--train.eval_batches", "3")
    done = run_torchrun(args, tmp_path, tmp_path / "run")
    assert done.stdout.count("response-only validation loss: ") == 1  # rank 0 reports, rank 1 is quiet
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("split") == "val"] == [0, 4]  # written once, not per rank
    assert any(line.get("tokens", 0) > 0 for line in lines if line.get("split") == "train")
    # The ranks shared the 3 validation batches; the starting model's loss is what one process measures.
    one = [a if a != str(tmp_path / "run") else str(tmp_path / "one") for a in args]
    assert main([*one, "--train.max_steps", "1"]) == 0
    start = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("run", "one")]
    assert start[0]["step"] == start[1]["step"] == 0
    assert start[0]["val_loss"] == pytest.approx(start[1]["val_loss"], rel=1e-6)


def test_a_recipe_may_not_change_the_shape_the_base_weights_fix(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  n_layer: 5\n  dropout: 0.1\n")
    assert main([*finetune_args(tmp_path), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.n_layer is 5 but 2 in the base run ") and err.count("\n") == 1
    assert "may change only model.dropout" in err and not (tmp_path / "run").exists()
