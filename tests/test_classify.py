import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import checkpoint as ckpt
from gptlab.classify import (
    ClassificationObjective,
    GPTClassifier,
    class_weights,
    classification_report,
    classify_texts,
    continuation_log_likelihoods,
    few_shot_examples,
    few_shot_scores,
    finetune_classify,
    load_classifier,
    load_pretrained,
    pad_batch,
    prepare_classification_data,
    read_table,
    resolve_source,
    set_trainable,
)
from gptlab.config import ClassifyConfig, GPTConfig, LoRAConfig, TrainConfig, config_to_dict
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.tokenizer import ByteTokenizer

CONFIG = GPTConfig(vocab_size=257, context_length=64, n_layer=2, n_head=2, n_embd=32)
SPAM_WORDS = ["win", "cash", "prize", "claim", "free", "txt", "urgent", "call", "now", "offer"]
HAM_WORDS = ["see", "you", "home", "later", "love", "dinner", "ok", "sorry", "tomorrow", "mum"]


def make_lm_run(run_dir, config=CONFIG):
    """A language model run written by hand: config, byte tokenizer, one checkpoint of random weights."""
    torch.manual_seed(0)
    model = GPT(config)
    ckpt.write_run_config(run_dir, {"task": "pretrain", "model": config_to_dict(config)})
    ByteTokenizer().save(run_dir / "tokenizer")
    ckpt.save_checkpoint(run_dir, 1, model.state_dict(), {"step": 1})
    return model


def write_messages(path, n_per_label=40, seed=0):
    """A TSV with a header of two clearly separable labels (their words do not overlap)."""
    rng = random.Random(seed)
    rows = [("spam", SPAM_WORDS)] * n_per_label + [("ham", HAM_WORDS)] * n_per_label
    lines = ["label\ttext"] + [f"{label}\t{' '.join(rng.choices(words, k=rng.randint(3, 8)))}" for label, words in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path, **options):
    config = ClassifyConfig(source=str(path), **options)
    return read_table(*resolve_source(config), config.text_column, config.label_column)


# ---------------------------------------------------------------- data


def test_sms_spam_reads_every_message_with_its_label(shared_data):
    table = read("sms-spam")
    assert len(table.texts) == 5574
    assert table.labels.count("spam") == 747 and table.labels.count("ham") == 4827
    assert table.texts[0].startswith("Go until jurong point")


def test_downsampled_split_is_balanced_disjoint_and_seeded(shared_data):
    data = prepare_classification_data(ClassifyConfig(balance="downsample"))
    assert data.labels == ["ham", "spam"]
    sizes = {name: len(split.texts) for name, split in data.splits.items()}
    assert sizes == {"train": 2 * 522, "validation": 2 * 74, "test": 2 * 151}
    for split in data.splits.values():
        assert split.label_ids.count(0) == split.label_ids.count(1)
    lines = [set(split.lines) for split in data.splits.values()]
    assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    again = prepare_classification_data(ClassifyConfig(balance="downsample"))
    assert again.splits["test"].lines == data.splits["test"].lines
    other = prepare_classification_data(ClassifyConfig(balance="downsample", split_seed=7))
    assert other.splits["test"].lines != data.splits["test"].lines


def test_unbalanced_split_keeps_the_label_proportions(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("label\ttext\n" + "".join(f"{'a' if i % 4 else 'b'}\tmessage {i}\n" for i in range(200)))
    data = prepare_classification_data(ClassifyConfig(source=str(path), split=[0.5, 0.25, 0.25]))
    test = data.splits["test"]
    # Per label: train and validation round down, the test split takes the rest (b: 25, 12, 13; a: 75, 37, 38).
    assert len(test.texts) == 51 and test.label_ids.count(1) == 13


def test_tsv_csv_and_json_lines_read_the_same_examples(tmp_path):
    rows = [("spam", 'Call "now", win £100'), ("ham", "ok, see you")]
    (tmp_path / "m.tsv").write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    (tmp_path / "m.csv").write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{label}\n'
                                                           for label, t in rows))  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"label": label, "text": t}) + "\n" for label, t in rows))
    (tmp_path / "headerless").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    tables = [read(tmp_path / name) for name in ("m.tsv", "m.csv", "m.jsonl")]
    tables.append(read(tmp_path / "headerless", columns=["label", "text"]))
    for table in tables:
        assert table.texts == [text for _, text in rows] and table.labels == ["spam", "ham"]


def test_configured_labels_set_the_ids_in_their_order(tmp_path):
    path = write_messages(tmp_path / "m.tsv", n_per_label=10)
    data = prepare_classification_data(ClassifyConfig(source=str(path), labels=["spam", "ham"]))
    train = data.splits["train"]
    assert data.labels == ["spam", "ham"]
    is_spam = [text.split()[0] in SPAM_WORDS for text in train.texts]
    assert is_spam == [label == 0 for label in train.label_ids] and any(is_spam) and not all(is_spam)


BAD_INPUTS = [
    ("label\ttext\nham\thi\nham\tyo\n", {}, "only the label 'ham'"),
    ("label\ttxt\nham\thi\nspam\tyo\n", {}, "column 'text' is not in"),
    ("lable\ttext\nham\thi\nspam\tyo\n", {}, "(did you mean 'lable'?)"),
    ("label\ttext\nham\thi\nspam\t  \n", {}, "line 3 has an empty text"),
    ("label\ttext\nham\thi\n\tyo\n", {}, "line 3 has no label"),
    ("label\ttext\nham\thi\nspam,yo\n", {}, "line 3 has 1 tsv fields where 2 columns"),
    ("label\ttext\nham\thi\neggs\tyo\n", {"labels": ["ham", "spam"]}, "label 'eggs'"),
    ("label\ttext\n", {}, "holds no rows"),
]


@pytest.mark.parametrize("content, options, message", BAD_INPUTS)
def test_bad_labelled_files_are_one_line_errors(tmp_path, content, options, message):
    path = tmp_path / "m.tsv"
    path.write_text(content)
    with pytest.raises(GptlabError) as error:
        prepare_classification_data(ClassifyConfig(source=str(path), **options))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"label": "spam"}, "line 2 has no field 'text'"),
        ({"label": "spam", "text": 5}, "line 2 holds 5 in field 'text', not a string"),
        ({"text": "yo"}, "line 2 has no field 'label'"),
        ({"label": ["spam"], "text": "yo"}, """line 2 holds ["spam"] in field 'label', not a string or number"""),
        ({"label": "spam", "text": " "}, "line 2 has an empty text"),
    ],
)
def test_json_lines_name_a_missing_or_mistyped_field(tmp_path, row, message):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"label": "ham", "text": "hi"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(GptlabError) as error:
        read(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_json_lines_may_number_their_labels(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"label": 0, "text": "hi"}) + "\n" + json.dumps({"label": 1, "text": "yo"}) + "\n")
    assert read(path).labels == ["0", "1"]


def test_mixed_delimiters_in_a_csv_name_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("label,text\nham,hi there\nspam\twin now\n")
    with pytest.raises(GptlabError, match="line 3 has 1 csv fields .* mixed delimiters"):
        read(path)


def test_invalid_config_choices_are_refused():
    with pytest.raises(
        GptlabError, match="classify.balance must be one of .*got 'downsampel' .did you mean 'downsample'"
    ):
        ClassifyConfig(balance="downsampel")
    with pytest.raises(GptlabError, match="classify.split"):
        ClassifyConfig(split=[0.8, 0.2, 0.0])


# ---------------------------------------------------------------- metrics


def test_report_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, 200)
    predicted = np.where(rng.random(200) < 0.7, true, rng.integers(0, 2, 200))  # label 2 predicted only when right
    predicted[true == 2] = 0  # ... and then never: its precision is 0 by convention
    report = classification_report(true.tolist(), predicted.tolist(), ["a", "b", "c"])
    precision, recall, f1, support = metrics.precision_recall_fscore_support(true, predicted, zero_division=0)
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(true, predicted))
    assert report["f1_macro"] == pytest.approx(metrics.f1_score(true, predicted, average="macro", zero_division=0))
    for k, label in enumerate("abc"):
        assert report["per_label"][label]["precision"] == pytest.approx(precision[k])
        assert report["per_label"][label]["recall"] == pytest.approx(recall[k])
        assert report["per_label"][label]["f1"] == pytest.approx(f1[k])
        assert report["per_label"][label]["support"] == support[k]
    assert report["confusion_matrix"] == metrics.confusion_matrix(true, predicted).tolist()


def test_class_weights_make_every_label_weigh_the_same():
    weights = class_weights([0, 0, 0, 1], 2)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    assert (weights * torch.tensor([3.0, 1.0])).tolist() == pytest.approx([2.0, 2.0])


# ---------------------------------------------------------------- the classifier


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_a_texts_logits(pooling):
    model = GPTClassifier(CONFIG, 3, pooling).eval()
    short, long = [5, 9, 12], [7, 1, 3, 8, 2, 2, 4]
    batch = pad_batch([short, long], pad_id=256)
    with torch.no_grad():
        together = model(batch["input"], batch["attention_mask"])
        alone = model(torch.tensor([short]))
        if pooling == "mean":
            hidden = model.hidden_states(torch.tensor([short]))
            assert torch.allclose(alone, model.lm_head(hidden.mean(1)), atol=1e-6)
    assert together.shape == (2, 3)
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_pretrained_weights_fill_all_but_the_new_head(tmp_path):
    lm = make_lm_run(tmp_path / "lm")
    model = GPTClassifier(CONFIG, 2)
    load_pretrained(model, tmp_path / "lm")
    assert torch.equal(model.blocks[1].mlp.fc.weight, lm.blocks[1].mlp.fc.weight)
    assert torch.equal(model.token_embedding.weight, lm.token_embedding.weight)
    assert model.lm_head.weight.shape == (2, CONFIG.n_embd)
    assert model.lm_head.weight is not model.token_embedding.weight


def test_a_classifier_is_no_start_for_another(tmp_path):
    ckpt.write_run_config(tmp_path / "c", {"task": "classify", "model": config_to_dict(CONFIG)})
    ckpt.save_checkpoint(tmp_path / "c", 1, GPTClassifier(CONFIG, 2).state_dict(), {"step": 1})
    with pytest.raises(GptlabError, match="already a classifier"):
        load_pretrained(GPTClassifier(CONFIG, 2), tmp_path / "c")


def trainable_names(trainable, **options):
    model = GPTClassifier(CONFIG, 2)
    set_trainable(model, ClassifyConfig(trainable=trainable, **options), LoRAConfig(rank=2))
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_choices_unfreeze_what_they_name():
    assert trainable_names("head") == {"lm_head.weight"}
    last = trainable_names("last_blocks", last_blocks=1)
    assert "lm_head.weight" in last and "ln_f.weight" in last and "blocks.1.attn.qkv.weight" in last
    assert not any(name.startswith(("blocks.0.", "token_embedding")) for name in last)
    assert len(trainable_names("all")) == len(list(GPTClassifier(CONFIG, 2).parameters()))
    lora = trainable_names("lora")
    assert lora - {"lm_head.weight"} and all(name.endswith(("lora_A", "lora_B")) for name in lora - {"lm_head.weight"})
    with pytest.raises(GptlabError, match="last_blocks is 3 but the model has 2 blocks"):
        trainable_names("last_blocks", last_blocks=3)


# ---------------------------------------------------------------- the objective


def make_objective(n=21, batch_size=4, seed=0, rank=0, world_size=1):
    sequences = [[i % 250 + 1] * (1 + i % 5) for i in range(n)]
    labels = [i % 2 for i in range(n)]
    config = TrainConfig(batch_size=batch_size, seed=seed, eval_batches=2)
    validation = (sequences[:6], labels[:6])
    return ClassificationObjective(
        CONFIG, (sequences, labels), validation, ["a", "b"], config, 0, rank=rank, world_size=world_size
    )


def test_batches_cover_an_epoch_and_resume_exactly():
    objective = make_objective()
    first_epoch = [objective.next_batch() for _ in range(5)]  # 21 examples: 5 batches, the last one dropped
    seen = torch.cat([b["input"][:, 0] for b in first_epoch])
    assert len(set(seen.tolist())) == 20
    state = objective.state_dict()
    expected = [objective.next_batch()["input"] for _ in range(3)]
    resumed = make_objective()
    resumed.load_state_dict(state)
    for batch, want in zip((resumed.next_batch()["input"] for _ in range(3)), expected, strict=True):
        assert torch.equal(batch, want)
    assert state["epoch"] == 0 and resumed.state_dict()["epoch"] == 1


def test_ranks_take_disjoint_batches_of_one_order():
    single = make_objective(n=24)
    ranks = [make_objective(n=24, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):  # one epoch: three steps of two batches
        firsts = [objective.next_batch()["input"][:, 0] for objective in ranks]
        assert torch.equal(torch.cat(firsts), torch.cat([single.next_batch()["input"][:, 0] for _ in range(2)]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_class_weights_enter_the_loss():
    objective = make_objective()
    objective.weights = torch.tensor([0.25, 1.75])
    model = GPTClassifier(CONFIG, 2).eval()
    batch = {**pad_batch([[1, 2], [3], [4, 5, 6], [7]], pad_id=0), "label": torch.tensor([0, 1, 1, 1])}
    logits = model(batch["input"], batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(logits, batch["label"], weight=objective.weights)
    assert objective.loss(model, batch).item() == pytest.approx(expected.item())
    assert expected.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, batch["label"]).item())


def test_batch_larger_than_the_training_split_is_refused():
    with pytest.raises(GptlabError, match="larger than the training split"):
        make_objective(n=3, batch_size=4)


# ---------------------------------------------------------------- finetuning runs


def finetune(tmp_path, trainable="all", steps=40, keep_checkpoints=2, **classify):
    make_lm_run(tmp_path / "lm")
    data = write_messages(tmp_path / "messages.tsv")
    values = {
        "out_dir": str(tmp_path / "run"),
        "init_from": str(tmp_path / "lm"),
        "classify": {"source": str(data), "trainable": trainable, **classify},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 3e-3, "eval_interval": steps // 2,
                  "warmup_steps": 0, "peak_flops": 1e11, "threads": 1, "device": "cpu",
                  "keep_checkpoints": keep_checkpoints},
    }  # fmt: skip
    return finetune_classify(values, overwrite=True)


def test_finetuning_learns_separable_labels_and_writes_the_run(tmp_path):
    result = finetune(tmp_path, pooling="mean")
    assert result.test["accuracy"] >= 0.9 and result.test["count"] == 16
    run_dir = result.run_dir
    config = ckpt.read_run_config(run_dir)
    assert config["task"] == "classify" and config["classify"]["labels"] == ["ham", "spam"]
    split = json.loads((run_dir / "split.json").read_text())
    assert not set(split["test"]) & set(split["train"]) and len(split["train"]) == 56
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert saved["test"]["accuracy"] == result.test["accuracy"] and "confusion_matrix" in saved["validation"]
    assert (run_dir / "curves.png").stat().st_size > 1000 and (run_dir / "confusion_matrix.png").is_file()
    val_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"val_accuracy", "val_f1_macro", "val_precision_spam", "train_accuracy"} <= set(val_records[-1])
    run = load_classifier(run_dir)
    assert isinstance(run.model, GPTClassifier)
    predictions = classify_texts(run, ["win cash prize now", "see you at home later love"])
    assert [p["label"] for p in predictions] == ["spam", "ham"]
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0)


def test_lora_finetuning_saves_adapters_and_the_head_only(tmp_path):
    result = finetune(tmp_path, trainable="lora", steps=10)
    weights = ckpt.load_weights(ckpt.find_checkpoint(result.run_dir) / ckpt.WEIGHTS_FILE)
    assert "lm_head.weight" in weights and "blocks.0.mlp.fc.weight" not in weights
    assert any(name.endswith("lora_A") for name in weights)
    run = load_classifier(result.run_dir)  # the frozen weights come from the base run, the adapters from the run
    base = ckpt.load_run(tmp_path / "lm").model
    assert torch.equal(run.model.blocks[0].mlp.fc.weight, base.blocks[0].mlp.fc.weight)
    assert torch.equal(run.model.blocks[0].mlp.fc.lora_B, weights["blocks.0.mlp.fc.lora_B"])
    assert weights["blocks.0.mlp.fc.lora_B"].abs().sum() > 0


def test_resumed_finetuning_ends_where_the_uninterrupted_one_does(tmp_path):
    full = finetune(tmp_path, steps=20, keep_checkpoints=5)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.run_dir, resumed_dir)
    (resumed_dir / "latest").write_text("step-0000010\n")  # as if killed after the first checkpoint
    values = {**ckpt.read_run_config(resumed_dir), "out_dir": str(resumed_dir)}
    resumed = finetune_classify(values, resume=True)
    assert resumed.test == full.test and resumed.train.train_loss == full.train.train_loss
    weights = [ckpt.load_weights(ckpt.find_checkpoint(run) / ckpt.WEIGHTS_FILE) for run in (full.run_dir, resumed_dir)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    records = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "val"]
    assert steps == [10, 20]  # continued from step 10, not started over

    # The labelled file changed since: a resume refuses it, unless told to go on with the new data.
    source = Path(values["classify"]["source"])
    source.write_text("\n".join(source.read_text().splitlines()[::2]) + "\n")
    (resumed_dir / "latest").write_text("step-0000010\n")
    with pytest.raises(GptlabError, match="changed since .* began .* resume with --allow-config-change"):
        finetune_classify(values, resume=True)
    finetune_classify(values, resume=True, allow_config_change=True)
    assert json.loads((resumed_dir / "split.json").read_text())["source"] == str(source)


def test_a_transformers_gpt2_imported_as_a_run_finetunes(tmp_path, shared_data):
    transformers = pytest.importorskip("transformers")
    from gptlab.interop import import_hf

    config = transformers.GPT2Config(n_positions=64, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "gpt2", tokenizer="gpt2")
    values = {
        "out_dir": str(tmp_path / "run"), "init_from": str(tmp_path / "gpt2"),
        "classify": {"source": str(write_messages(tmp_path / "m.tsv", n_per_label=10)), "trainable": "head"},
        "train": {"max_steps": 4, "eval_interval": 2, "peak_flops": 1e11, "threads": 1, "device": "cpu"},
    }  # fmt: skip
    result = finetune_classify(values)
    run = load_classifier(result.run_dir)
    assert run.tokenizer.kind == "gpt2" and run.model.lm_head.weight.shape == (2, 16)
    assert classify_texts(run, ["free cash"])[0]["label"] in ("ham", "spam")
    assert classify_texts(run, "free cash") == classify_texts(run, ["free cash"])  # one text, not its characters
    with pytest.raises(GptlabError, match="expected a text or a list of texts"):
        classify_texts(run, [None])


def test_classifier_requires_a_start_and_refuses_stray_lora_options(tmp_path):
    with pytest.raises(GptlabError, match="--init-from RUN"):
        finetune_classify({"out_dir": str(tmp_path / "run")})
    make_lm_run(tmp_path / "lm")
    with pytest.raises(GptlabError, match="classify.trainable is not lora"):
        finetune_classify({"init_from": str(tmp_path / "lm"), "lora": {"rank": 4}})


def test_load_classifier_refuses_a_language_model(tmp_path):
    make_lm_run(tmp_path / "lm")
    with pytest.raises(GptlabError, match="is not a classifier .task: pretrain."):
        load_classifier(tmp_path / "lm")


# ---------------------------------------------------------------- few-shot


def test_continuation_likelihoods_equal_a_plain_forward_pass():
    model = GPT(CONFIG).eval()
    pairs = [([5, 6, 7, 8], [9, 10]), ([1, 2], [3]), ([4] * 9, [11, 12, 13])]
    scores = continuation_log_likelihoods(model, pairs, pad_id=256, batch_size=2)
    for (prompt, continuation), score in zip(pairs, scores, strict=True):
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            log_probs = model(ids)[0].log_softmax(-1)
        expected = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(continuation))
        assert score.item() == pytest.approx(expected.item(), abs=1e-4)


def test_few_shot_prompt_scores_each_label_after_the_examples():
    model = GPT(GPTConfig(vocab_size=257, context_length=128, n_layer=1, n_head=2, n_embd=16)).eval()
    tokenizer = ByteTokenizer()
    examples = [("free cash", "spam"), ("hi mum", "ham")]
    scores = few_shot_scores(model, tokenizer, examples, ["win now"], ["ham", "spam"])
    prompt = "Message: free cash\nLabel: spam\n\nMessage: hi mum\nLabel: ham\n\nMessage: win now\nLabel:"
    expected = continuation_log_likelihoods(
        model, [(tokenizer.encode(prompt), tokenizer.encode(f" {label}")) for label in ("ham", "spam")], 256
    )
    assert torch.allclose(scores[0], expected, atol=1e-4)


def test_few_shot_examples_take_turns_between_labels(tmp_path):
    path = write_messages(tmp_path / "m.tsv", n_per_label=10)
    data = prepare_classification_data(ClassifyConfig(source=str(path)))
    examples = few_shot_examples(data.splits["train"], data.labels, 4, seed=1)
    assert sorted(label for _, label in examples) == ["ham", "ham", "spam", "spam"]
    assert examples == few_shot_examples(data.splits["train"], data.labels, 4, seed=1)


def test_too_many_examples_for_the_context_is_an_error():
    model = GPT(CONFIG).eval()
    examples = [("a long message about nothing", "ham")] * 8
    with pytest.raises(GptlabError, match="8 examples do not fit the model's context of 64 tokens"):
        few_shot_scores(model, ByteTokenizer(), examples, ["text"], ["ham", "spam"])
