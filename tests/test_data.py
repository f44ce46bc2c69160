"""Preparing corpora into shards, reuse, bad input, samplers with exact resume, eval batches, DataLoader."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from gptlab import data
from gptlab.config import DataConfig
from gptlab.data import (
    WindowDataset,
    embedded_default_text,
    eval_batches,
    load_prepared,
    make_dataloader,
    make_sampler,
    prepare_corpus,
    token_dtype,
)
from gptlab.errors import GptlabError
from gptlab.tokenizer import EOT, ByteTokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))


def prepare(source, tmp_path=None, **kwargs):
    config = DataConfig(source=str(source), **{k: kwargs.pop(k) for k in list(kwargs) if hasattr(DataConfig, k)})
    return prepare_corpus(config, **kwargs)


def decoded(corpus, split: str) -> str:
    return corpus.tokenizer.decode(getattr(corpus, f"{split}_tokens").tolist())


# ---------------------------------------------------------------- sources and shards


def test_embedded_default_is_english_prose_on_every_python():
    text = embedded_default_text()
    assert len(text.encode()) > 400_000
    assert text.count(EOT) > 50
    assert " the " in text and 'The "assert" statement' in text


def test_embedded_default_is_prepared_without_arguments():
    corpus = prepare("", tokenizer="byte")
    assert corpus.meta["split"] == "documents"
    assert corpus.meta["source"].startswith("embedded default")
    assert decoded(corpus, "train") + decoded(corpus, "val") == embedded_default_text() + EOT
    assert corpus.train_tokens.dtype == np.uint16 and isinstance(corpus.train_tokens, np.memmap)


def test_single_text_file_holds_out_its_tail(shared_data):
    text = (shared_data / "the-verdict.txt").read_text()
    corpus = prepare(shared_data / "the-verdict.txt", tokenizer="byte", val_fraction=0.2)
    train, val = decoded(corpus, "train"), decoded(corpus, "val")
    assert corpus.meta["split"] == "tail"
    assert train + val == text + EOT
    assert val.endswith(EOT) and EOT not in train
    assert 0.15 < corpus.meta["val_bytes"] / len(text.encode()) < 0.25
    assert corpus.meta["files"] == [
        {"path": str(shared_data / "the-verdict.txt"), "bytes": 20479, "sha256": corpus.meta["files"][0]["sha256"]}
    ]


def test_folder_is_read_recursively_and_split_by_whole_files(tmp_path):
    folder = tmp_path / "books"
    for i in range(10):
        path = folder / f"part{i // 5}" / f"{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Document number {i}.\n" * 20)
    (folder / ".hidden.txt").write_text("never read")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("never read either")
    (folder / "empty.txt").write_text("")
    corpus = prepare(folder, tokenizer="byte", val_fraction=0.2)
    train, val = decoded(corpus, "train"), decoded(corpus, "val")
    assert corpus.meta["split"] == "documents"
    assert train.count(EOT) == 8 and val.count(EOT) == 2
    assert val == "".join(f"Document number {i}.\n" * 20 + EOT for i in (8, 9))
    assert "never" not in train + val


def test_json_lines_documents_end_with_end_of_text(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"line {i} ünïcode", "id": i} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = prepare(path, tokenizer="byte", val_fraction=0.1)
    assert decoded(corpus, "train") + decoded(corpus, "val") == "".join(r["text"] + EOT for r in rows)
    assert decoded(corpus, "val") == "".join(r["text"] + EOT for r in rows[18:])
    # Byte counts (the basis of bits per byte) are of the text, not of the JSON around it.
    val_text = "".join(r["text"] for r in rows[18:])
    assert corpus.meta["val_bytes"] == len(val_text.encode())
    assert corpus.meta["val_bytes_per_token"] == pytest.approx(len(val_text.encode()) / (len(val_text.encode()) + 2))


def test_a_validation_split_of_blank_lines_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n' + "\n" * 5)
    with pytest.raises(GptlabError, match="validation split .* holds no text"):
        prepare(path, tokenizer="byte", val_fraction=0.2)


def test_named_data_set_with_gpt2_tokens(shared_data):
    corpus = prepare("tinyshakespeare", tokenizer="gpt2")
    assert corpus.tokenizer.kind == "gpt2" and corpus.train_tokens.dtype == np.uint16
    assert corpus.meta["train_tokens"] + corpus.meta["val_tokens"] == 338025 + 1
    assert 3.0 < corpus.meta["val_bytes_per_token"] < 3.5


def test_bpe_is_trained_on_the_train_split_and_saved_with_the_shards(shared_data):
    corpus = prepare("the-verdict", tokenizer="bpe", vocab_size=400)
    assert corpus.tokenizer.vocab_size == 400
    assert (corpus.directory / "tokenizer.json").is_file()
    again = load_prepared(corpus.directory)
    assert again.tokenizer.fingerprint() == corpus.tokenizer.fingerprint()
    assert np.array_equal(again.val_tokens, corpus.val_tokens)


def test_uint32_shards_when_the_vocabulary_outgrows_uint16():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_chunked_parallel_tokenizing_equals_one_pass(shared_data, tmp_path):
    whole = prepare("tinyshakespeare", tokenizer="gpt2", out=tmp_path / "whole", workers=1)
    chunked = prepare("tinyshakespeare", tokenizer="gpt2", out=tmp_path / "chunked", chunk_bytes=100_000, workers=2)
    assert np.array_equal(whole.train_tokens, chunked.train_tokens)
    assert np.array_equal(whole.val_tokens, chunked.val_tokens)


def test_prepared_shards_are_reused_until_the_source_changes(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("A first version of the corpus.\n" * 100)
    first = prepare(path, tokenizer="byte")
    assert not first.reused
    again = prepare(path, tokenizer="byte")
    assert again.reused and again.directory == first.directory
    path.write_text("A second version of the corpus.\n" * 100)
    changed = prepare(path, tokenizer="byte")
    assert not changed.reused and changed.directory != first.directory


def test_shards_another_process_finished_meanwhile_are_kept(tmp_path, monkeypatch):
    # Two runs prepare the same corpus at once: the one that finishes second keeps the first's shards
    # (which that run may have open) instead of replacing them, or failing on the full folder.
    path = tmp_path / "corpus.txt"
    path.write_text("Both runs read this corpus.\n" * 100)
    first = prepare(path, tokenizer="byte")
    inode = (first.directory / "train.bin").stat().st_ino
    checks = []
    real = data._is_prepared

    def not_yet_at_the_start(*args):
        checks.append(1)
        return len(checks) > 1 and real(*args)  # the first look finds nothing, as it did for both runs

    monkeypatch.setattr(data, "_is_prepared", not_yet_at_the_start)
    second = prepare(path, tokenizer="byte")
    assert second.directory == first.directory and (second.directory / "train.bin").stat().st_ino == inode
    assert np.array_equal(np.asarray(second.train_tokens), np.asarray(first.train_tokens))
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_a_saved_bpe_tokenizer_reuses_the_shards_it_was_trained_with(shared_data, tmp_path):
    from gptlab.tokenizer import load_tokenizer

    first = prepare("the-verdict", tokenizer="bpe", vocab_size=300)
    first.tokenizer.save(tmp_path / "run-tokenizer")
    resumed = prepare_corpus(
        DataConfig(source="the-verdict", tokenizer="bpe", vocab_size=300), load_tokenizer(tmp_path / "run-tokenizer")
    )
    assert resumed.reused and resumed.directory == first.directory


def test_progress_reports_bytes_up_to_the_total(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Some words on a line.\n" * 2000)
    calls = []
    prepare(path, tokenizer="byte", chunk_bytes=4096, workers=1, progress=lambda done, total: calls.append(done))
    assert len(calls) > 5 and calls == sorted(calls) and calls[-1] == path.stat().st_size


def test_out_folder_that_holds_other_files_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(GptlabError, match="is not a prepared corpus"):
        prepare("the-verdict", tokenizer="byte", out=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- bad input


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptlabError, match="empty.txt is empty"):
        prepare(tmp_path / "empty.txt", tokenizer="byte")


def test_invalid_utf8_says_where_and_offers_replacement(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\n" * 50 + b"bad \xff byte\n" + b"good line\n" * 50)
    with pytest.raises(GptlabError, match=r"bad.txt: invalid UTF-8 at byte 504 \(line 51\).*replace"):
        prepare(path, tokenizer="byte")
    corpus = prepare(path, tokenizer="byte", encoding_errors="replace")
    assert "bad \ufffd byte" in decoded(corpus, "train") + decoded(corpus, "val")


def test_invalid_utf8_deep_in_a_file_tokenized_in_parallel_chunks(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a good line\n" * 4000 + b"\xc3\x28 broken\n" + b"a good line\n" * 4000)
    with pytest.raises(GptlabError, match=r"invalid UTF-8 at byte 48000 \(line 4001\)"):
        prepare(path, tokenizer="byte", chunk_bytes=5000, workers=2, val_fraction=0.6)


def test_json_line_without_text_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"body": "no text"}\n{"text": "fine"}\n')
    with pytest.raises(GptlabError, match=r'docs.jsonl line 3: no "text" field'):
        prepare(path, tokenizer="byte")


def test_unknown_and_task_data_set_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GptlabError, match="no file or folder 'tinyshakespear'.*did you mean 'tinyshakespeare'"):
        prepare("tinyshakespear", tokenizer="byte")
    with pytest.raises(GptlabError, match="not a corpus"):
        prepare("sms-spam", tokenizer="byte")


def test_bad_settings_are_refused_before_reading():
    with pytest.raises(GptlabError, match="too small"):
        prepare("the-verdict", tokenizer="bpe", vocab_size=100)
    with pytest.raises(GptlabError, match="val_fraction"):
        prepare("the-verdict", tokenizer="byte", val_fraction=0.0)
    with pytest.raises(GptlabError, match="unknown tokenizer kind"):
        prepare("the-verdict", tokenizer="chars")


def test_corpus_shorter_than_one_window():
    with pytest.raises(GptlabError, match="fewer than one window"):
        make_sampler(np.arange(10, dtype=np.uint16), context_length=10, batch_size=2)
    with pytest.raises(GptlabError, match="validation split"):
        eval_batches(np.arange(10, dtype=np.uint16), 16, 2, 4)


# ---------------------------------------------------------------- samplers


TOKENS = np.arange(1000, dtype=np.uint32)  # token i at position i: a window's first input is its offset


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_targets_are_inputs_shifted_by_one(kind):
    x, y = make_sampler(TOKENS, 16, 4, kind=kind).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_resume_continues_exactly_like_an_uninterrupted_sampler(kind):
    straight = make_sampler(TOKENS, 8, 3, kind=kind, stride=5, seed=7)
    expected = [straight.next_batch()[0] for _ in range(100)]
    first = make_sampler(TOKENS, 8, 3, kind=kind, stride=5, seed=7)
    for _ in range(37):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_sampler(TOKENS, 8, 3, kind=kind, stride=5, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[0], x) for x in expected[37:])


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_same_seed_same_batches_other_seed_other_batches(kind):
    a, b, c = (make_sampler(TOKENS, 8, 4, kind=kind, seed=s) for s in (1, 1, 2))
    xa, xb, xc = (s.next_batch()[0] for s in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_sequential_windows_use_every_token_once_per_epoch():
    sampler = make_sampler(TOKENS, 10, 3, kind="sequential", stride=10, seed=0)
    windows = len(range(0, len(TOKENS) - 10, 10))  # 99: the last window needs one more target token
    starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(windows // 3)]).tolist()
    assert sorted(starts) == list(range(0, 990, 10))
    assert starts != sorted(starts)  # shuffled
    assert sampler.state_dict()["epoch"] == 1


def test_ranks_take_disjoint_shares_of_each_epoch():
    seen = []
    for rank in range(3):
        sampler = make_sampler(TOKENS, 10, 11, kind="sequential", seed=3, rank=rank, world_size=3)
        seen.append(set(torch.cat([sampler.next_batch()[0][:, 0] for _ in range(3)]).tolist()))
    assert all(len(s) == 33 for s in seen)
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
    streams = [make_sampler(TOKENS, 10, 8, seed=3, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert not torch.equal(*streams)


def test_sampler_checks_its_arguments():
    with pytest.raises(GptlabError, match="unknown sampler"):
        make_sampler(TOKENS, 8, 2, kind="shuffled")
    with pytest.raises(GptlabError, match="rank 2 is outside"):
        make_sampler(TOKENS, 8, 2, rank=2, world_size=2)
    sampler = make_sampler(TOKENS, 8, 2, kind="random")
    with pytest.raises(GptlabError, match="cannot resume a random sampler"):
        sampler.load_state_dict(make_sampler(TOKENS, 8, 2, kind="sequential").state_dict())


def test_eval_batches_are_fixed_evenly_spread_and_disjoint():
    batches = eval_batches(TOKENS, 16, 4, max_batches=5)
    again = eval_batches(TOKENS, 16, 4, max_batches=5)
    assert len(batches) == 5 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts[0] == 0 and starts[-1] == len(TOKENS) - 17
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:], strict=False))
    assert all(torch.equal(y, x + 1) for x, y in batches)


def test_eval_batches_of_a_short_split_give_one_smaller_batch():
    batches = eval_batches(np.arange(40, dtype=np.uint16), 16, 4, max_batches=5)
    assert [x.shape for x, _ in batches] == [(2, 16)]


# ---------------------------------------------------------------- torch Dataset / DataLoader


def test_window_dataset_is_the_books_sliding_window():
    dataset = WindowDataset(TOKENS, context_length=4, stride=2)
    assert len(dataset) == len(range(0, 996, 2))
    x, y = dataset[3]
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_memory_mapped_dataset_pickles_without_its_tokens(shared_data):
    corpus = prepare("tinyshakespeare", tokenizer="byte")
    dataset = WindowDataset(corpus.train_tokens, 32)
    blob = pickle.dumps(dataset)
    assert len(blob) < 2000
    assert torch.equal(pickle.loads(blob)[100][0], dataset[100][0])


def test_dataloader_with_workers_gives_the_same_batches(shared_data):
    corpus = prepare("the-verdict", tokenizer="byte")
    plain = list(make_dataloader(corpus.train_tokens, 32, 8, seed=5))
    workers = list(make_dataloader(corpus.train_tokens, 32, 8, seed=5, num_workers=2))
    assert len(plain) == len(corpus.train_tokens) // 32 // 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, workers, strict=True))
    assert torch.equal(plain[0][1][:, :-1], plain[0][0][:, 1:])


def test_byte_corpus_round_trips_through_the_shards(tmp_path):
    text = "Grüße aus Köln! 😀\n" * 300
    (tmp_path / "t.txt").write_text(text)
    corpus = prepare(tmp_path / "t.txt", tokenizer="byte")
    assert ByteTokenizer().decode(np.concatenate([corpus.train_tokens, corpus.val_tokens]).tolist()) == text + EOT
    assert data.META_FILE in {p.name for p in corpus.directory.iterdir()}


def test_sequential_sampler_resumes_on_more_ranks_without_hanging():
    from gptlab.data import make_sampler

    tokens = np.arange(2000, dtype=np.uint16)
    one = make_sampler(tokens, 16, 4, kind="sequential", seed=3)
    for _ in range(20):
        one.next_batch()
    state = one.state_dict()
    shares = []
    for rank in range(2):
        sampler = make_sampler(tokens, 16, 4, kind="sequential", seed=3, rank=rank, world_size=2)
        sampler.load_state_dict(state)
        assert sampler.epoch == state["epoch"] + 1 or sampler.position == state["position"] // 2
        shares.append(sampler.next_batch()[0])
    assert not torch.equal(shares[0], shares[1])
