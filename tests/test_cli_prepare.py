"""`gptlab prepare` end to end: the summary, the shards on disk, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))


def test_prepare_writes_shards_and_prints_a_summary(shared_data, tmp_path, capsys):
    out = tmp_path / "verdict"
    assert main(["prepare", "the-verdict", "--tokenizer", "gpt2", "--val-fraction", "0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert "prepared data set the-verdict with the gpt2 tokenizer" in printed
    assert f"{meta['train_tokens']:,} tokens" in printed and "bytes/token" in printed and str(out) in printed
    train = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r")
    assert len(train) == meta["train_tokens"] and meta["dtype"] == "uint16"
    assert (out / "tokenizer_config.json").is_file()

    assert main(["prepare", "the-verdict", "--tokenizer", "gpt2", "--val-fraction", "0.2", "--out", str(out)]) == 0
    assert "reused the shards of data set the-verdict" in capsys.readouterr().out


def test_prepare_a_folder_with_a_trained_bpe(shared_data, tmp_path, capsys):
    folder = tmp_path / "story"
    folder.mkdir()
    paragraphs = (shared_data / "the-verdict.txt").read_text().split("\n\n")
    for i in range(4):
        (folder / f"{i}.md").write_text("\n\n".join(paragraphs[i::4]))
    assert main(["prepare", str(folder), "--tokenizer", "bpe", "--vocab-size", "300", "--val-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "with the bpe tokenizer (300 ids)" in printed and "split  documents" in printed
    assert "note:" not in printed
    # A corpus too small for the vocabulary asked: the smaller one it yields is said.
    assert main(["prepare", str(folder), "--tokenizer", "bpe", "--vocab-size", "60000", "--val-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    ids = int(printed.split("bpe tokenizer (")[1].split(" ids")[0].replace(",", ""))
    assert ids < 60000 and f"note: the corpus yields a BPE vocabulary of {ids:,} ids, fewer than the 60,000" in printed


def test_list_names_the_data_sets(capsys):
    assert main(["prepare", "--list"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("the-verdict", "tinyshakespeare", "sms-spam", "instruction-preference"))


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: (d / "empty.txt").write_text(""), ["empty.txt"], "empty.txt is empty"),
        (lambda d: (d / "bad.txt").write_bytes(b"ok\n\xc3(" * 9), ["bad.txt"], "invalid UTF-8 at byte 3 (line 2)"),
        (lambda d: (d / "d.jsonl").write_text('{"text": "a"}\n{"txt": 1}\n'), ["d.jsonl"], 'line 2: no "text"'),
        (lambda d: None, ["no-such-data-set"], "no file or folder 'no-such-data-set'"),
        (lambda d: None, ["the-verdict", "--vocab-size", "200"], "vocabulary size 200 is too small"),
        (lambda d: None, ["the-verdict", "--val-fraction", "1.5"], "val_fraction must be between 0 and 1"),
        (lambda d: (d / "afile").write_text("hi"), ["the-verdict", "--out", "afile"], "afile is a file, not a folder"),
        (lambda d: (d / "afile").write_text("hi"), ["the-verdict", "--out", "afile/sub"], "afile is a file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, setup, args, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_replacement_characters_on_request(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    assert main(["prepare", "bad.txt", "--tokenizer", "byte", "--encoding-errors", "replace"]) == 0


def test_the_installed_command_exits_non_zero(tmp_path):
    gptlab = Path(sys.executable).with_name("gptlab")
    result = subprocess.run(
        [str(gptlab), "prepare", str(tmp_path / "missing.txt")], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no file or folder") and "Traceback" not in result.stderr


def test_a_damaged_meta_and_a_killed_preparations_leftovers_are_dealt_with(shared_data, tmp_path, capsys):
    out = tmp_path / "verdict"
    prepare = ["prepare", "the-verdict", "--tokenizer", "byte", "--out", str(out)]
    assert main(prepare) == 0
    (out / "meta.json").write_text('{"truncated')  # a disk that filled, say
    # A preparation killed earlier left its temporary folder; its process (a finished child here) is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"verdict.tmp-{dead.stdout.strip()}"
    (leftover / "train.bin").parent.mkdir()
    (leftover / "train.bin").write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert main(prepare) == 0
    assert "prepared data set the-verdict" in capsys.readouterr().out  # prepared again, not reused or refused
    assert json.loads((out / "meta.json").read_text())["train_tokens"] > 0 and not leftover.exists()


def test_a_source_that_is_neither_file_nor_folder_is_named(capsys):
    assert main(["prepare", "/dev/null"]) == 2
    assert "'/dev/null' is neither a file nor a folder" in capsys.readouterr().err
