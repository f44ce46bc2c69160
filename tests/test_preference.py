import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import WEIGHTS_FILE, find_checkpoint, load_weights, read_run_config
from gptlab.cli import main
from gptlab.config import PreferenceConfig
from gptlab.errors import GptlabError
from gptlab.instruct import SPLIT_DIR, prompt_and_reference
from gptlab.model import GPT
from gptlab.preference import (
    REFERENCE_FILE,
    RESPONSES_FILE,
    check_preference_record,
    collate_pairs,
    dpo_loss,
    encode_pair,
    finetune_preference,
    load_preference_records,
    preference_metrics,
    response_log_probs,
    with_response,
)
from gptlab.templates import ALPACA, CHAT
from gptlab.tokenizer import ByteTokenizer
from test_instruct import CONFIG, WORDS, base_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def preference_records(repeat=3):
    """The tiny model learns to prefer saying the word twice over saying it and 'no'."""
    return [{"instruction": "Twice.", "input": w, "chosen": f"{w} {w}", "rejected": f"{w} no"} for w in WORDS * repeat]


def run_values(tmp_path, records=None, **sections):
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(records if records is not None else preference_records()))
    train = dict(max_steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, eval_interval=6, log_interval=6,
                 eval_batches=4, peak_flops=1e11, sample_tokens=0, threads=1, seed=0)  # fmt: skip
    return {
        "init_from": str(base_run(tmp_path)),
        "out_dir": str(tmp_path / "run"),
        "template": "chat",
        "preference": {"source": str(data), "response_tokens": 6, **sections.pop("preference", {})},
        "train": {**train, **sections.pop("train", {})},
        **sections,
    }


# ---------------------------------------------------------------- the loss


def test_dpo_loss_is_log_two_at_the_start_and_follows_the_formula():
    policy = torch.tensor([[-10.0, -12.0], [-8.0, -7.0]])
    loss, rewards = dpo_loss(policy, policy.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(rewards, torch.zeros(2, 2))

    reference = torch.tensor([[-11.0, -11.0], [-8.0, -8.0]])
    loss, rewards = dpo_loss(policy, reference, beta=0.5)
    margins = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-8 + 8) - (-7 + 8))]  # 1.0 and -0.5
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == [[0.5, -0.5], [0.0, 0.5]]

    smoothed, _ = dpo_loss(policy, reference, beta=0.5, label_smoothing=0.2)
    flipped = sum(-math.log(1 / (1 + math.exp(m))) for m in margins) / 2
    assert smoothed.item() == pytest.approx(0.8 * expected + 0.2 * flipped, rel=1e-6)

    metrics = preference_metrics(policy, reference, beta=0.5)
    assert metrics["reward_accuracy"] == 0.5 and metrics["reward_margin"] == pytest.approx(0.25)


def test_response_log_probs_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    tokenizer = ByteTokenizer()
    pair = encode_pair(preference_records()[0], CHAT, tokenizer, 64)
    batch = collate_pairs([pair, pair], tokenizer.eot_id)
    assert batch["input"].shape[0] == 4  # chosen rows, then rejected rows
    got = response_log_probs(model, batch)

    for column, example in enumerate((pair.chosen, pair.rejected)):
        ids = torch.tensor(example.ids)
        logprobs = F.log_softmax(model(ids[None, :-1])[0], dim=-1)
        picked = logprobs[torch.arange(len(ids) - 1), ids[1:]]
        expected = picked[torch.tensor(example.response[1:])].sum()
        assert got[0, column].item() == pytest.approx(expected.item(), abs=1e-4)
        assert got[1, column].item() == pytest.approx(expected.item(), abs=1e-4)


def test_gradients_of_response_log_probs_match_plain_autograd():
    torch.manual_seed(1)
    model = GPT(CONFIG)
    tokenizer = ByteTokenizer()
    pairs = [encode_pair(r, CHAT, tokenizer, 64) for r in preference_records()[:3]]
    batch = collate_pairs(pairs, tokenizer.eot_id)
    response_log_probs(model, batch).sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch["input"])
    token = -F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), reduction="sum")
    token.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(ours, model.parameters(), strict=True))


# ---------------------------------------------------------------- records


def test_preference_records_become_instruction_records_with_either_response():
    alpaca = {"instruction": "Say hi.", "input": "", "chosen": "Hello!", "rejected": "Go away.", "output": "Hi."}
    assert with_response(alpaca, alpaca["rejected"]) == {"instruction": "Say hi.", "input": "", "output": "Go away."}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "What?"}
    assert with_response(chat, "Hello!")["messages"][-1] == {"role": "assistant", "content": "Hello!"}
    check_preference_record(chat, "record 0")
    check_preference_record(alpaca, "record 0")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "a", "chosen": "b"}, "lacks 'rejected'"),
        ({"instruction": "a", "chosen": 1, "rejected": "c"}, "'chosen' must be a string, got int"),
        ({"chosen": "b", "rejected": "c"}, "lacks 'instruction'"),
        (
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "chosen": "b",
                "rejected": "c",
            },
            "must end with the user's turn",
        ),  # fmt: skip
        ([1, 2], "must be a JSON object, got list"),
    ],
)
def test_bad_preference_records_are_one_line_errors(record, message):
    with pytest.raises(GptlabError, match=message):
        check_preference_record(record, "record 3")


def test_pairs_whose_response_is_truncated_away_are_left_out():
    tokenizer = ByteTokenizer()
    record = preference_records()[0]
    prompt = prompt_and_reference(with_response(record, ""), ALPACA)[0]
    prompt_tokens = len(tokenizer.encode(prompt))
    assert encode_pair(record, ALPACA, tokenizer, prompt_tokens + 10) is not None
    assert encode_pair(record, ALPACA, tokenizer, prompt_tokens - 1) is None  # no answer token left


def test_config_checks_beta_and_label_smoothing():
    with pytest.raises(GptlabError, match="preference.beta must be above 0"):
        PreferenceConfig(beta=0)
    with pytest.raises(GptlabError, match=r"preference.label_smoothing must be in \[0, 0.5\)"):
        PreferenceConfig(label_smoothing=0.5)
    with pytest.raises(GptlabError, match="preference.trainable must be all or lora"):
        PreferenceConfig(trainable="head")


@pytest.mark.skipif(not (SHARED / "instruction-data-with-preference.json").is_file(), reason="needs ../shared/data")
def test_the_books_preference_data_loads_without_its_identical_pairs(monkeypatch):
    monkeypatch.setenv("GPTLAB_DATA_DIR", str(SHARED))
    records, same = load_preference_records("instruction-preference")
    assert len(records) + same == 1100 and same == 6
    assert all(r["chosen"] != r["rejected"] for r in records)


# ---------------------------------------------------------------- runs


def test_dpo_run_learns_to_prefer_the_chosen_responses(tmp_path):
    result = finetune_preference(run_values(tmp_path))
    assert result.start_eval["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.start_eval["reward_accuracy"] == 0.0
    assert result.final_eval["val_loss"] < 0.5 and result.final_eval["reward_accuracy"] == 1.0
    assert result.test_metrics["reward_accuracy"] == 1.0 and result.test_metrics["reward_margin"] > 0.5
    run = tmp_path / "run"
    stored = json.loads((run / SPLIT_DIR / REFERENCE_FILE).read_text())
    assert [len(stored[n]) for n in ("train", "validation", "test")] == [25, 2, 3]
    responses = json.loads((run / RESPONSES_FILE).read_text())
    assert len(responses) == 3 and all(r["output"] == r["chosen"] and "response" in r for r in responses)
    assert json.loads((run / "test_metrics.json").read_text()) == result.test_metrics
    assert read_run_config(run)["task"] == "preference"


def test_dpo_run_resumed_from_a_checkpoint_ends_exactly_as_one_straight_run(tmp_path):
    values = run_values(tmp_path, train={"max_steps": 6, "eval_interval": 3})
    finetune_preference(values)
    run, copy = tmp_path / "run", tmp_path / "halted"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000006")
    (copy / "latest").write_text("step-0000003\n")  # as if killed after the checkpoint at step 3
    (copy / SPLIT_DIR / REFERENCE_FILE).unlink()  # recomputed from the starting weights, not the resumed ones
    finetune_preference({**read_run_config(copy), "out_dir": str(copy)}, resume=True)
    assert (copy / SPLIT_DIR / REFERENCE_FILE).read_text() == (run / SPLIT_DIR / REFERENCE_FILE).read_text()
    straight = load_weights(find_checkpoint(run) / WEIGHTS_FILE)
    resumed = load_weights(find_checkpoint(copy) / WEIGHTS_FILE)
    assert find_checkpoint(copy).name == "step-0000006"
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_preference_run_takes_its_base_runs_template(tmp_path):
    values = run_values(tmp_path, train={"max_steps": 2, "eval_interval": 2})
    del values["template"]
    base_config = Path(values["init_from"]).parents[1] / "config.yaml"
    base_config.write_text(base_config.read_text() + "template: chat\n")
    finetune_preference(values)
    assert read_run_config(tmp_path / "run")["template"] == "chat"


FAST = ["--train.max_steps", "4", "--train.batch_size", "4", "--train.eval_interval", "4", "--train.eval_batches", "1",
        "--train.peak_flops", "1e11", "--train.threads", "1", "--train.sample_tokens", "4",
        "--preference.response_tokens", "6"]  # fmt: skip


def cli_args(tmp_path, records=None, *extra):
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(records if records is not None else preference_records()))
    return ["finetune", "preference", "--init-from", str(base_run(tmp_path)), "--out", str(tmp_path / "run"),
            "--template", "chat", "--preference.source", str(data), *FAST, *extra]  # fmt: skip


def test_cli_preference_with_lora_trains_adapters_and_reports(tmp_path, capsys):
    assert main(cli_args(tmp_path, None, "--lora", "--lora.rank", "2", "--lora.targets", "attn.qkv")) == 0
    out = capsys.readouterr().out
    assert "validation DPO loss: 0.6931 -> " in out and "validation reward accuracy: 0.0000 -> " in out
    assert "test split: reward accuracy " in out and "over 3 pairs" in out and "(LoRA)" in out
    weights = load_weights(find_checkpoint(tmp_path / "run") / WEIGHTS_FILE)
    assert sorted(weights) == [f"blocks.{i}.attn.qkv.lora_{m}" for i in (0, 1) for m in "AB"]
    assert main(["lora", "merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert read_run_config(tmp_path / "merged")["task"] == "preference"


@pytest.mark.parametrize(
    "records, extra, message",
    [
        ([{"instruction": "a", "chosen": "b"}] * 20, [], "lacks 'rejected'"),
        ([{"instruction": "a", "chosen": "b", "rejected": "b"}] * 20, [], "same chosen and rejected response"),
        (None, ["--preference.beta", "-1"], "preference.beta must be above 0"),
        (None, ["--preference.max_length", "4"], "no training or validation pair keeps two different answers"),
        (None, ["--preference.max_length", "999"], "preference.max_length 999 exceeds the model's context length 64"),
        (None, ["--train.batch_size", "0"], "train.batch_size must be positive, got 0"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, records, extra, message):
    assert main(cli_args(tmp_path, records, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_resuming_a_finished_run_reports_it(tmp_path, capsys):
    assert main(cli_args(tmp_path)) == 0
    capsys.readouterr()
    assert main(["finetune", "preference", "--resume", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and "test split: reward accuracy " in out


def test_cli_an_overwrite_that_fails_leaves_the_run_it_would_replace_intact(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(cli_args(tmp_path)) == 0
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    assert main(cli_args(tmp_path, None, "--overwrite", "--preference.max_length", "4")) == 2
    assert "no training or validation pair keeps two different answers" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()} == before


def test_torchrun_tunes_with_each_rank_on_its_own_pairs(tmp_path):
    """Two gloo ranks share one run: the same reference on both, set up and written by rank 0 only."""
    from conftest import run_torchrun

    args = cli_args(tmp_path, None, "--train.device", "cpu", "--train.eval_batches", "1")
    done = run_torchrun(args, tmp_path, tmp_path / "run")
    assert done.stdout.count("validation DPO loss: 0.6931 -> ") == 1  # rank 0 reports, rank 1 is quiet
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("split") == "val"] == [0, 4]
    assert len(json.loads((tmp_path / "run" / RESPONSES_FILE).read_text())) == 3
    # Each rank scored half of the pairs for the reference; together they match one process scoring all.
    assert "reference log-probabilities: 15/15 pairs (rank 0's share)" in done.stdout
    assert "reference log-probabilities of 30 pairs over 2 ranks" in done.stdout
    one = run_values(tmp_path, train={"max_steps": 1, "eval_interval": 1})
    finetune_preference({**one, "out_dir": str(tmp_path / "one")})
    ranked, single = (json.loads((tmp_path / run / SPLIT_DIR / REFERENCE_FILE).read_text()) for run in ("run", "one"))
    assert ranked["fingerprint"] == single["fingerprint"]
    for split in ("train", "validation", "test"):
        torch.testing.assert_close(torch.tensor(ranked[split]), torch.tensor(single[split]), rtol=1e-5, atol=1e-5)


def test_dropout_is_off_unless_asked_for(tmp_path):
    values = run_values(tmp_path, train={"max_steps": 1, "eval_interval": 1})
    base_config = Path(values["init_from"]).parents[1] / "config.yaml"
    base_config.write_text(base_config.read_text().replace("dropout: 0.0", "dropout: 0.2"))
    assert "dropout: 0.2" in base_config.read_text()
    finetune_preference(values)
    assert read_run_config(tmp_path / "run")["model"]["dropout"] == 0.0
    finetune_preference({**values, "model": {"dropout": 0.1}}, overwrite=True)
    assert read_run_config(tmp_path / "run")["model"]["dropout"] == 0.1


def test_only_the_final_answer_of_a_chat_record_is_scored():
    tokenizer = ByteTokenizer()
    record = {
        "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Colour?"},
        ],
        "chosen": "Blue.", "rejected": "No.",
    }  # fmt: skip
    pair = encode_pair(record, CHAT, tokenizer, 200)
    scored = [t for t, r in zip(pair.chosen.ids, pair.chosen.response, strict=True) if r]
    assert tokenizer.decode(scored) == "Blue." + tokenizer.decode([tokenizer.eot_id])


def test_pairs_cut_to_the_same_tokens_are_left_out():
    tokenizer = ByteTokenizer()
    record = {"instruction": "Twice.", "input": "red", "chosen": "red red", "rejected": "red no"}
    prompt_tokens = len(tokenizer.encode(prompt_and_reference(with_response(record, ""), ALPACA)[0]))
    assert encode_pair(record, ALPACA, tokenizer, prompt_tokens + 4) is not None  # "red " then r / n differ
    assert encode_pair(record, ALPACA, tokenizer, prompt_tokens + 3) is None  # both cut to "red"


def test_a_stored_reference_for_other_tokens_is_recomputed(tmp_path):
    values = run_values(tmp_path, train={"max_steps": 4, "eval_interval": 2})
    finetune_preference(values)
    run = tmp_path / "run"
    first = json.loads((run / SPLIT_DIR / REFERENCE_FILE).read_text())
    (run / "latest").write_text("step-0000002\n")
    lines = []
    changed = {**read_run_config(run), "out_dir": str(run)}
    changed["preference"] = {**changed["preference"], "max_length": 40}
    finetune_preference(changed, resume=True, allow_config_change=True, log=lines.append)
    again = json.loads((run / SPLIT_DIR / REFERENCE_FILE).read_text())
    assert any("computing it again" in line for line in lines)
    assert again["fingerprint"] != first["fingerprint"] and again["train"] != first["train"]


def test_a_run_never_replaces_the_run_it_starts_from(tmp_path, capsys):
    base = base_run(tmp_path)  # tmp_path/base/checkpoints/step-...
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(preference_records()))
    args = ["finetune", "preference", "--init-from", str(base.parents[1]), "--out", str(base.parents[1]),
            "--preference.source", str(data), "--template", "chat", *FAST, "--overwrite"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lie inside the new run's directory" in err and "--out" in err and err.count("\n") == 1
    assert find_checkpoint(base.parents[1]) == base  # untouched
