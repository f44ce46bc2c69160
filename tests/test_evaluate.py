"""Scoring held-out text: sliding windows, exact per-token context, and `gptlab eval perplexity` end to end."""

import json
import math

import numpy as np
import pytest
import torch

from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.evaluate import score_tokens, sliding_windows
from gptlab.model import GPT
from test_cli_pretrain import TINY


@pytest.mark.parametrize("n_tokens", [2, 3, 10, 33, 64])
@pytest.mark.parametrize("context, stride", [(4, 4), (4, 1), (8, 3), (16, 16), (5, 2)])
def test_windows_score_every_target_once_within_the_context(n_tokens, context, stride):
    scored = []
    for begin, end, count in sliding_windows(n_tokens, context, stride):
        assert 0 < end - begin <= context and 0 < count <= end - begin
        scored += range(end - count + 1, end + 1)  # target positions of the window's last `count` inputs
    assert scored == list(range(1, n_tokens))


def test_a_stride_of_one_gives_each_token_exactly_its_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 40)
    for context in (16, 6):
        expected = 0.0
        with torch.no_grad():
            for t in range(1, len(tokens)):
                window = torch.tensor(tokens[max(0, t - context) : t])[None]
                expected -= torch.log_softmax(model(window)[0, -1], dim=-1)[tokens[t]].item()
        score = score_tokens(model, tokens, context, stride=1, batch_size=5)
        assert score.tokens == 39 and score.loss == pytest.approx(expected / 39, rel=1e-6)
    with pytest.raises(GptlabError, match="stride must be between 1 and the context length 16"):
        score_tokens(model, tokens, 16, stride=17)


def test_eval_perplexity_scores_the_runs_own_held_out_text(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *TINY, "--data.source", str(shared_data / "the-verdict.txt"),
            "--train.max_steps", "4", "--train.eval_interval", "4", "--train.eval_batches", "1000"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "perplexity", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = json.loads(next((tmp_path / "cache" / "prepared").glob("*/meta.json")).read_text())
    val_tokens = meta["val_tokens"]
    assert result["split"] == "val" and result["tokens"] == val_tokens - 1 and result["stride"] == 32
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # The text's bytes behind the scored tokens: all the split's but the first token's (end-of-text has none).
    assert result["bytes"] == meta["val_bytes"] - 1
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])
    # Training's own validation loss covers the same non-overlapping windows (all that fit).
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["loss"] == pytest.approx(val["val_loss"], abs=0.02)

    assert main(["eval", "perplexity", str(run), "--split", "all", "--stride", "8", "--max-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert "(all split, 500 tokens, byte tokenizer, context 32, stride 8)" in out and "bits per byte" in out
    assert main(["eval", "perplexity", str(run), "--split", "all", "--max-tokens", "500", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 500


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "byte"])
def test_text_bytes_are_the_utf8_bytes_of_the_documents_without_their_separators(kind, shared_data):
    from gptlab.evaluate import text_bytes
    from gptlab.tokenizer import build_tokenizer

    docs = ["Caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9 \U0001f600.", "A second document, plain ASCII."]
    tokenizer = build_tokenizer(kind, [(shared_data / "the-verdict.txt").read_text()] if kind == "bpe" else None, 300)
    tokens = np.array(tokenizer.encode(docs[0]) + [tokenizer.eot_id] + tokenizer.encode(docs[1]))
    assert text_bytes(tokenizer, tokens) == sum(len(doc.encode()) for doc in docs)
    assert text_bytes(tokenizer, tokens, chunk=3) == text_bytes(tokenizer, tokens)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stride", "0"], "--stride must be at least 1, got 0"),
        (["--context", "64"], "context 64 exceeds the model's context length 32"),
        (["--data", "no-such-set"], "no-such-set"),
    ],
)
def test_eval_perplexity_bad_input_is_one_line(tmp_path, shared_data, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *TINY, "--data.source", str(shared_data / "the-verdict.txt"),
            "--train.max_steps", "1", "--train.eval_interval", "1"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "perplexity", str(run), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_each_choice_scores_the_log_probabilities_of_its_own_tokens_after_the_context():
    from gptlab.evaluate import ChoiceItem, score_choices
    from gptlab.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=16, n_layer=2, n_head=2, n_embd=16)).train()
    tokenizer = ByteTokenizer()
    items = [
        ChoiceItem("The cat sat on the", ["mat.", "moon, far away.", "x"], 0),
        ChoiceItem("", ["Hello", "Bye"], 1),  # no context: the choice follows end-of-text
        ChoiceItem("a context much longer than the sixteen positions", ["end", "stop"], 1),  # keeps its end
    ]
    score = score_choices(model, tokenizer, items, separator=" ", batch_size=3)
    assert model.training  # the model's mode is given back
    model.eval()
    for item, scored in zip(items, score.choices, strict=True):
        for choice, got in zip(item.choices, scored, strict=True):
            context, continuation = tokenizer.encode(item.context) or [256], tokenizer.encode(" " + choice)
            ids = (context + continuation)[-17:]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
            n = len(ids) - 1
            expected = sum(log_probs[n - k - 1, ids[n - k]].item() for k in range(len(continuation)))
            assert got["log_likelihood"] == pytest.approx(expected, abs=1e-4)
            assert got["tokens"] == len(continuation) == got["bytes"]  # a byte a token
    for rule, key in score.RULES.items():
        picks = [max(range(len(c)), key=lambda j, c=c: c[j][key]) for c in score.choices]
        right = [p == item.label for p, item in zip(picks, items, strict=True)]
        accuracy, stderr = score.accuracy(rule)
        assert accuracy == sum(right) / 3 and stderr == pytest.approx((accuracy * (1 - accuracy) / 2) ** 0.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny pretrained run (byte tokenizer, context 128) for the eval choice commands."""
    from conftest import SHARED_DATA as shared_data

    if not shared_data.is_dir():
        pytest.skip(f"shared data folder {shared_data} is absent")
    folder = tmp_path_factory.mktemp("choice")
    run = folder / "run"
    args = ["pretrain", "--out", str(run), *TINY, "--data.source", str(shared_data / "the-verdict.txt"),
            "--train.max_steps", "2", "--train.eval_interval", "2", "--model.context_length", "128"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTLAB_CACHE", str(folder / "cache"))
        assert main(args) == 0
    return run


def test_eval_choice_on_preference_pairs_and_hellaswags_format(tiny_run, tmp_path, shared_data, capsys):
    from gptlab.evaluate import read_choice_items
    from gptlab.templates import format_instruction

    # The book's preference pairs (those with answers that fit) as two-choice items: the chosen answer first
    # or second in turn.
    pairs = json.loads((shared_data / "instruction-data-with-preference.json").read_text())
    pairs = [p for p in pairs if max(len(p["chosen"].encode()), len(p["rejected"].encode())) < 120][:12]
    with open(tmp_path / "pairs.jsonl", "w") as out:
        for i, pair in enumerate(pairs):
            choices = [pair["chosen"], pair["rejected"]][:: 1 if i % 2 == 0 else -1]
            context = format_instruction("alpaca", pair["instruction"], pair["input"])
            out.write(json.dumps({"context": context, "choices": choices, "label": i % 2}) + "\n")
    capsys.readouterr()
    details = tmp_path / "details.jsonl"
    command = ["eval", "choice", str(tiny_run), "--data", str(tmp_path / "pairs.jsonl")]
    assert main([*command, "--limit", "10", "--json", "--details", str(details)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["items"] == 10 and result["choices"] == 20
    records = [json.loads(line) for line in details.read_text().splitlines()]
    right = [r["pick_accuracy_per_token"] == r["label"] for r in records]
    assert len(records) == 10 and result["accuracy_per_token"] == sum(right) / 10
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "(12 items, 24 choices," in out and "accuracy per byte" in out and "±" in out

    (tmp_path / "hs.jsonl").write_text(
        "\ufeff" + json.dumps({"ctx": "A man", "endings": ["a", "b", "c"], "label": "2"})
    )
    assert read_choice_items(tmp_path / "hs.jsonl")[0].label == 2  # HellaSwag's keys; a byte-order mark is fine


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 1 is not JSON"),
        ('{"context": "a", "label": 0}', "line 1 has none of the keys endings, choices"),
        (
            '{"context": "a", "choices": ["x", "y"], "label": 2}',
            "the label must be the index of a choice, 0 to 1, got 2",
        ),
        ('{"context": "a", "choices": ["x"], "label": 0}', "at least two non-empty texts"),
        ('{"context": "a", "choices": ["x", "' + "y" * 140 + '"], "label": 0}', "a choice of 141 tokens does not fit"),
    ],
)
def test_eval_choice_bad_items_are_one_line_errors(line, message, tiny_run, tmp_path, capsys):
    (tmp_path / "items.jsonl").write_text(line + "\n")
    capsys.readouterr()
    assert main(["eval", "choice", str(tiny_run), "--data", str(tmp_path / "items.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
