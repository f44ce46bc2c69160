"""SMS spam, balanced as in the book: a small gptlab GPT, pretrained on unlabelled messages and finetuned
as a classifier, beside TF-IDF + logistic regression baselines, all on the same seeded test split.

1. Split the balanced data (the 747 spam messages and 747 of the ham; 70/10/20 per label, seed 123).
2. Pretrain a small GPT, with a BPE tokenizer trained on the same text, on every message outside
   the validation and test splits, labels unused (the training split and the ham the balancing left
   out), unless --base names a language model run to start from.
3. Finetune it as a classifier (the last block, the final norm and the head; mean pooling) with
   `gptlab finetune classify`'s code, once per training seed (the split stays the same).
4. Prompt the pretrained model with K labelled examples (`gptlab classify --few-shot K`) on the test split.
5. Fit TF-IDF + logistic regression (word 1-2-grams, and character 2-5-grams) on the training split.
6. Print a table (test accuracy, macro F1, training seconds on this machine) and write
   benchmarks/results/classify_spam.json.

    .venv/bin/python benchmarks/classify_spam.py
    .venv/bin/python benchmarks/classify_spam.py --base runs/gpt2 --lr 5e-5 --pooling last --seeds 123
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from host import describe

RESULTS = Path(__file__).parent / "results" / "classify_spam.json"
SPLIT = {"source": "sms-spam", "balance": "downsample"}  # the book's setup; split and seed are the defaults
BASE_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 128, "context_length": 128}
TOKENIZER = {"tokenizer": "bpe", "vocab_size": 1024}


def held_out_free_corpus(work: Path) -> tuple[Path, int]:
    """The SMS messages outside the validation and test splits, as JSON lines for pretraining."""
    from gptlab.classify import prepare_classification_data, read_table, resolve_source
    from gptlab.config import ClassifyConfig

    config = ClassifyConfig(**SPLIT)
    data = prepare_classification_data(config)
    held_out = set(data.splits["validation"].lines) | set(data.splits["test"].lines)
    table = read_table(*resolve_source(config), config.text_column, config.label_column)
    texts = [text for text, line in zip(table.texts, table.lines, strict=True) if line not in held_out]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "unlabelled_messages.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path, len(texts)


def pretrain_base(work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from gptlab.train import pretrain

    corpus, messages = held_out_free_corpus(work)
    values = {
        "out_dir": str(work / "lm"), "preset": "demo", "model": BASE_MODEL,
        "data": {"source": str(corpus), **TOKENIZER},
        "train": {"max_steps": args.pretrain_steps, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 20,
                  "eval_interval": args.pretrain_steps, "log_interval": 50, "sample_tokens": 0,
                  "threads": args.threads, "seed": args.seed},
    }  # fmt: skip
    start = time.perf_counter()
    result, run_dir = pretrain(values, overwrite=True, log=print)
    return run_dir, {
        "messages": messages, "steps": result.step, "val_loss": result.last_eval.get("val_loss"),
        "unigram_loss": result.last_eval.get("unigram_loss"), "seconds": time.perf_counter() - start,
    }  # fmt: skip


def finetune(base: Path, work: Path, seed: int, args: argparse.Namespace) -> dict:
    from gptlab.classify import finetune_classify

    values = {
        "init_from": str(base), "out_dir": str(work / f"classifier-seed{seed}"),
        "classify": {**SPLIT, "trainable": args.trainable, "pooling": args.pooling},
        "train": {"max_steps": args.steps, "batch_size": 8, "learning_rate": args.lr, "warmup_steps": 20,
                  "eval_interval": max(1, args.steps // 4), "log_interval": 100, "threads": args.threads,
                  "seed": seed},
    }  # fmt: skip
    start = time.perf_counter()
    result = finetune_classify(values, overwrite=True, log=print)
    return {
        "run": str(result.run_dir), "seed": seed, "steps": result.train.step, "trainable_parameters": result.trainable_parameters,
        "seconds": time.perf_counter() - start, "test": result.test, "validation": result.validation,
    }  # fmt: skip


def few_shot(base: Path, k: int, seed: int) -> dict:
    from gptlab.classify import few_shot_evaluate, few_shot_examples, load_language_model, prepare_classification_data
    from gptlab.config import ClassifyConfig

    run = load_language_model(base)
    data = prepare_classification_data(ClassifyConfig(**SPLIT, labels=["ham", "spam"]))
    examples = few_shot_examples(data.splits["train"], data.labels, k, seed)
    start = time.perf_counter()
    report = few_shot_evaluate(run.model, run.tokenizer, data, examples, batch_size=16)
    return {"inference_seconds": time.perf_counter() - start, "test": report}


def tfidf_baselines() -> dict[str, dict]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from gptlab.classify import classification_report, prepare_classification_data
    from gptlab.config import ClassifyConfig

    data = prepare_classification_data(ClassifyConfig(**SPLIT))
    train, test = data.splits["train"], data.splits["test"]
    vectorizers = {
        "TF-IDF word 1-2-grams + LR": TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        "TF-IDF char 2-5-grams + LR": TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    }
    results = {}
    for name, vectorizer in vectorizers.items():
        start = time.perf_counter()
        model = make_pipeline(vectorizer, LogisticRegression(C=10.0, max_iter=2000)).fit(train.texts, train.label_ids)
        seconds = time.perf_counter() - start
        report = classification_report(test.label_ids, model.predict(test.texts).tolist(), data.labels)
        results[name] = {"seconds": seconds, "test": report}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-spam"), help="folder for the runs")
    parser.add_argument("--base", type=Path, help="a language model run to finetune (default: pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="pretraining steps of 16 x 128 tokens")
    parser.add_argument("--steps", type=int, default=600, help="finetuning steps of 8 messages")
    parser.add_argument("--lr", type=float, default=1e-3, help="finetuning learning rate")
    parser.add_argument("--trainable", default="last_blocks", help="head, last_blocks, all or lora")
    parser.add_argument("--pooling", default="mean", help="last or mean")
    parser.add_argument("--few-shot", type=int, default=4, help="examples in the prompt (-1: skip)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the pretraining and the few-shot examples")
    parser.add_argument("--seeds", default="1337,1,2", help="finetuning seeds, comma-separated")
    args = parser.parse_args()
    os.environ.setdefault("GPTLAB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

    rows: dict[str, dict] = {}
    pretrained = None
    base = args.base
    if base is None:
        base, pretrained = pretrain_base(args.work, args)
    tuned = [finetune(base, args.work, int(seed), args) for seed in args.seeds.split(",")]
    pretrain_seconds = pretrained["seconds"] if pretrained else 0.0
    for run in tuned:
        rows[f"gptlab GPT, finetuned, seed {run['seed']}"] = {
            "seconds": pretrain_seconds + run["seconds"],
            "test": run["test"],
        }
    if args.few_shot >= 0:  # no training beyond the pretraining
        prompted = few_shot(base, args.few_shot, args.seed)
        rows[f"gptlab GPT, {args.few_shot}-shot prompt"] = {"seconds": pretrain_seconds, **prompted}
    rows.update(tfidf_baselines())

    accuracies = [run["test"]["accuracy"] for run in tuned]
    print(f"\nbalanced SMS spam, test split of {tuned[0]['test']['count']} messages")
    print(f"{'method':<36} {'accuracy':>9} {'macro F1':>9} {'train s':>8}")
    for name, row in rows.items():
        print(f"{name:<36} {row['test']['accuracy']:>9.2%} {row['test']['f1_macro']:>9.4f} {row['seconds']:>8.1f}")
    print(f"gptlab finetuned over {len(tuned)} seeds: mean {sum(accuracies) / len(accuracies):.2%}, "
          f"lowest {min(accuracies):.2%}")  # fmt: skip
    if pretrained:
        finetune_seconds = ", ".join(f"{run['seconds']:.0f}" for run in tuned)
        print(f"(gptlab: {pretrained['seconds']:.0f} s pretraining on {pretrained['messages']} unlabelled messages, "
              f"then {finetune_seconds} s finetuning per seed)")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {**describe(), "threads": args.threads}
    results = {
        "machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "base_model": {**BASE_MODEL, **TOKENIZER} if pretrained else str(base), "pretraining": pretrained,
        "finetuning": tuned, "finetuned_accuracy": {"mean": sum(accuracies) / len(accuracies), "lowest": min(accuracies)},
        "table": {name: {"accuracy": r["test"]["accuracy"], "f1_macro": r["test"]["f1_macro"],
                         "seconds": r["seconds"]} for name, r in rows.items()},
        "reports": {name: r["test"] for name, r in rows.items()},
    }  # fmt: skip
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
