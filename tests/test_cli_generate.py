import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from gptlab.checkpoint import load_run, save_checkpoint, write_run_config
from gptlab.cli import main
from gptlab.config import GenerationConfig, GPTConfig
from gptlab.generate import generate
from gptlab.model import GPT
from gptlab.tokenizer import ByteTokenizer

TINY = GPTConfig(vocab_size=257, context_length=32, n_layer=2, n_head=2, n_embd=32)


def make_run(run_dir, template: str | None = None, config: GPTConfig = TINY):
    """A run directory with an untrained tiny model, as training would leave it."""
    torch.manual_seed(0)
    values = {"task": "pretrain", "model": asdict(config)}
    if template:
        values["template"] = template
    write_run_config(run_dir, values)
    ByteTokenizer().save(run_dir / "tokenizer")
    save_checkpoint(run_dir, 0, GPT(config).state_dict(), {})
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


def test_generate_streams_the_prompt_and_its_completion(run_dir, capsys):
    assert main(["generate", str(run_dir), "Hello", "--max-new-tokens", "12", "--greedy"]) == 0
    run = load_run(run_dir)
    (expected,) = generate(run.model, run.tokenizer, "Hello", GenerationConfig(temperature=0, max_new_tokens=12))
    assert capsys.readouterr().out == "Hello" + expected + "\n"


def test_json_samples_are_reproducible_with_a_seed_and_differ(run_dir, capsys):
    args = ["generate", str(run_dir), "The", "--json", "--num-samples", "3", "--seed", "5", "--temperature", "2"]
    args += ["--max-new-tokens", "16", "--stop-at-eot", "false"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["completions"] == again["completions"]
    assert len(set(first["completions"])) == 3
    assert first["prompt"] == "The" and first["config"]["seed"] == 5


def test_prompt_after_the_options_is_the_prompt(run_dir, capsys):
    assert main(["generate", str(run_dir), "Hello", "--greedy", "--max-new-tokens", "6"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(run_dir), "--greedy", "--max-new-tokens", "6", "Hello"]) == 0
    assert capsys.readouterr().out == first and first.startswith("Hello")
    assert main(["generate", str(run_dir), "--greedy", "Hello", "again"]) == 2  # two prompts: refused, not merged
    assert "unknown option or argument 'Hello'" in capsys.readouterr().err


def test_the_runs_template_needs_a_run_finetuned_on_one(run_dir, capsys):
    assert main(["generate", str(run_dir), "Hi", "--template", "run"]) == 2
    assert "was not finetuned on a template; name one (--template alpaca or chat)" in capsys.readouterr().err


def test_prompt_file_gives_the_same_output_as_the_argument(run_dir, tmp_path, capsys):
    prompt = "line one\nline two"
    (tmp_path / "prompt.txt").write_text(prompt)
    common = ["--json", "--greedy", "--max-new-tokens", "8"]
    assert main(["generate", str(run_dir), prompt, *common]) == 0
    from_argument = json.loads(capsys.readouterr().out)["completions"]
    assert main(["generate", str(run_dir), "--prompt-file", str(tmp_path / "prompt.txt"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == from_argument


def test_empty_prompt_starts_from_end_of_text(run_dir, capsys):
    assert main(["generate", str(run_dir), "", "--json", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 1


def test_long_prompt_warns_once_on_stderr(run_dir, capsys):
    assert main(["generate", str(run_dir), "x" * 50, "--greedy", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "keeping the last 32" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["--max-new-tokens", "-5"], "max_new_tokens must be a positive integer"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "top_k must be at least 1"),
        (["--top-k", "many"], "invalid value 'many' for top_k"),
        (["--top-k", "2.5"], "invalid value '2.5' for top_k: it must be a whole number or none"),
        (["--temperature", "nan"], "invalid value 'nan' for temperature: it must be a finite number"),
        (["--repetition-penalty", "inf"], "invalid value 'inf' for repetition_penalty"),
        (["--prompt-overflow", "error", "--max-new-tokens", "2", "--prompt-file", "-"], "use prompt_overflow"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
    ],
)
def test_bad_options_are_one_line_errors(run_dir, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y" * 40))
    prompt = [] if "--prompt-file" in flags else ["hi"]
    assert main(["generate", str(run_dir), *prompt, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert captured.out == ""


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_incompatible_checkpoint_is_a_one_line_error(run_dir, capsys):
    wider = asdict(TINY) | {"n_embd": 64}
    write_run_config(run_dir, {"task": "pretrain", "model": wider})
    assert main(["generate", str(run_dir), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def chat(run_dir, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gptlab", "chat", str(run_dir), "--greedy", "--stop", "\n", *flags]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("template", [None, "alpaca"])
def test_chat_answers_each_line_from_stdin_until_quit(tmp_path, template):
    run_dir = make_run(tmp_path / "run", template=template)
    result = chat(run_dir, "hello\n\n/reset\n/rest\nhow are you\n/quit\nnever read\n", "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 2  # one reply line per message; blank lines and commands answer nothing
    assert "unknown command /rest; /reset forgets the conversation" in result.stderr


def test_chat_refuses_an_unknown_template(run_dir, capsys):
    assert main(["chat", str(run_dir), "--template", "alpacca"]) == 2
    expected = "error: unknown prompt template 'alpacca' (did you mean 'alpaca'?); known: alpaca, chat\n"
    assert capsys.readouterr().err == expected


def test_a_closed_output_pipe_ends_quietly(run_dir):
    """`gptlab generate RUN --json | head -3`: the reader may leave before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    command = [sys.executable, "-m", "gptlab", "generate", str(run_dir), "The", "--json", "--max-new-tokens", "4"]
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("text", [b"", b"task: pretrain\n", b"\xff\xfe\x00binary", b"- a list\n"])
def test_a_damaged_config_is_a_one_line_error(run_dir, capsys, text):
    (run_dir / "config.yaml").write_bytes(text)
    for command in (["generate", str(run_dir), "x"], ["export", str(run_dir), str(run_dir.parent / "hf")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert "config.yaml is damaged (it holds no model section)" in err or "must hold a mapping" in err
