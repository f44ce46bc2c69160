import dataclasses
import json

import pytest

from gptlab.cli import main
from test_classify import CONFIG, make_lm_run, write_messages

TRAIN = ["--train.max_steps", "30", "--train.batch_size", "8", "--train.learning_rate", "3e-3",
         "--train.eval_interval", "15", "--train.warmup_steps", "0", "--train.peak_flops", "1e11",
         "--train.threads", "1", "--train.device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A language model run, a labelled TSV, and a classifier finetuned from them through the CLI."""
    root = tmp_path_factory.mktemp("classify")
    make_lm_run(root / "lm", dataclasses.replace(CONFIG, context_length=128))  # room for two byte-level examples
    data = write_messages(root / "messages.tsv")
    args = ["finetune", "classify", "--init-from", str(root / "lm"), "--out", str(root / "clf"),
            "--classify.source", str(data), "--classify.trainable", "all", "--classify.pooling", "mean", *TRAIN]  # fmt: skip
    assert main(args) == 0
    return root


def run_json(capsys, args):
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_finetune_reports_the_test_split_and_writes_the_run(runs):
    assert (runs / "clf" / "test_metrics.json").is_file() and (runs / "clf" / "confusion_matrix.png").is_file()
    assert json.loads((runs / "clf" / "test_metrics.json").read_text())["test"]["accuracy"] >= 0.9


def test_classify_texts_prints_labels_with_probabilities(runs, capsys):
    result = run_json(capsys, ["classify", str(runs / "clf"), "claim free cash prize now", "sorry mum see you later"])
    assert [p["label"] for p in result["predictions"]] == ["spam", "ham"]
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0) for p in result["predictions"])
    assert result["metrics"] is None
    assert main(["classify", str(runs / "clf"), "claim free cash prize now"]) == 0
    assert capsys.readouterr().out.startswith("spam\t")
    # Texts may also follow the options.
    assert main(["classify", str(runs / "clf"), "--batch-size", "1", "claim free cash prize now", "see you later"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["spam", "ham"]


def test_classify_a_labelled_file_reports_metrics(runs, capsys, tmp_path):
    messages = write_messages(tmp_path / "more.tsv", n_per_label=5, seed=3)
    result = run_json(capsys, ["classify", str(runs / "clf"), "--file", str(messages)])
    assert len(result["predictions"]) == 10 and result["metrics"]["count"] == 10
    texts = tmp_path / "texts.txt"
    texts.write_text("win cash now\n\nsee you at home\n")
    assert [p["label"] for p in run_json(capsys, ["classify", str(runs / "clf"), "--file", str(texts)])["predictions"]] == [
        "spam", "ham"
    ]  # fmt: skip


def test_classify_without_texts_reproduces_the_test_metrics(runs, capsys):
    report = run_json(capsys, ["classify", str(runs / "clf")])
    saved = json.loads((runs / "clf" / "test_metrics.json").read_text())["test"]
    assert report["accuracy"] == saved["accuracy"] and report["confusion_matrix"] == saved["confusion_matrix"]
    assert main(["classify", str(runs / "clf")]) == 0
    assert "confusion matrix" in capsys.readouterr().out


def test_few_shot_reports_on_the_same_test_split(runs, capsys):
    report = run_json(capsys, ["classify", str(runs / "lm"), "--few-shot", "2", "--labels", "ham,spam",
                               "--split-from", str(runs / "clf")])  # fmt: skip
    saved = json.loads((runs / "clf" / "test_metrics.json").read_text())["test"]
    assert report["count"] == saved["count"] and report["shots"] == 2 and report["labels"] == ["ham", "spam"]
    result = run_json(capsys, ["classify", str(runs / "lm"), "win now", "--few-shot", "0", "--labels", "ham,spam",
                               "--classify.source", str(runs / "messages.tsv")])  # fmt: skip
    assert result["predictions"][0]["label"] in ("ham", "spam")


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "{lm}", "hello"], "is not a classifier (task: pretrain)"),
        (["classify", "{clf}", ""], "text 1 is empty or only spaces"),
        (["classify", "{clf}", "hello", " "], "text 2 is empty or only spaces"),
        (["classify", "{clf}", "--few-shot", "2", "--labels", "ham,spam"], "is a classifier, not a language model"),
        (["classify", "{lm}", "--few-shot", "2"], "--few-shot needs the label names"),
        (["classify", "{clf}", "--labels", "a,b"], "--labels and --split-from go with --few-shot"),
        (["finetune", "classify", "--out", "{root}/x"], "--init-from RUN"),
        (["finetune", "classify", "--init-from", "{lm}", "--out", "{root}/x", "--classify.source", "{root}/messages.tsv",
          "--classify.label_column", "kind"], "column 'kind' is not in"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line_errors(runs, capsys, args, message):
    capsys.readouterr()
    paths = {"lm": runs / "lm", "clf": runs / "clf", "root": runs}
    assert main([arg.format(**paths) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_finetune_group_lists_classify(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "classify" in capsys.readouterr().out
