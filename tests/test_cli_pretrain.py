"""End-to-end tests of `gptlab pretrain`: the real CLI on tiny models, a real SIGKILL and resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptlab.checkpoint import read_run_config
from gptlab.cli import main

TINY = [
    "--preset", "tiny", "--data.tokenizer", "byte", "--train.batch_size", "4", "--train.warmup_steps", "2",
    "--train.eval_batches", "2", "--train.sample_tokens", "8", "--train.peak_flops", "1e11",
    "--model.context_length", "32", "--model.dropout", "0.1",
]  # fmt: skip


def verdict_args(shared_data: Path) -> list[str]:
    return ["--data.source", str(shared_data / "the-verdict.txt")]


def train_records(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


def test_pretrain_writes_run_and_refuses_to_clobber(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "6",
            "--train.eval_interval", "3", "--train.log_interval", "1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "MFU" in out and "left" in out and "sample" in out
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "latest", "best", "tokenizer/tokenizer_config.json"):
        assert (run / name).exists(), name
    assert len(train_records(run)) == 6
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_resume_with_changed_config_is_refused_with_the_fields(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "4",
                 "--train.eval_interval", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--train.learning_rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "--allow-config-change" in err
    assert main(["pretrain", "--resume", str(run), "--train.max_steps", "6", "--allow-config-change"]) == 0
    assert [s for s, _ in train_records(run)][-1] == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.max_stepz", "3"], "did you mean --train.max_steps?"),
        (["--preset", "tiny", "--model.n_head", "3"], "divisible"),
        (["--train.max_steps", "abc"], "invalid value"),
        (["--train.max_steps", "0"], "max_steps must be positive"),
        (["--data.source", "no-such-data-set"], "no-such-data-set"),
        (["--preset", "gpt5"], "unknown model preset"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, capsys, args, message):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def snapshot(run_dir: Path) -> dict[Path, bytes]:
    """Every file of a run, byte for byte."""
    return {path.relative_to(run_dir): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--model.context_length", "100000"], "context"),  # the data check, before the loop
        (["--train.tokens_per_step", "1"], "smaller than one batch"),  # the loop's own check
    ],
)
def test_a_failed_run_leaves_the_run_it_would_replace_intact_and_no_directory_of_its_own(
    tmp_path, shared_data, capsys, monkeypatch, bad, message
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    args = [*TINY, *verdict_args(shared_data), "--train.max_steps", "2", "--train.eval_interval", "2"]
    assert main(["pretrain", "--out", str(run), *args]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), *args, *bad, "--overwrite"]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["pretrain", "--out", str(fresh), *args, *bad]) == 2
    assert not fresh.exists()
    assert main(["pretrain", "--out", str(fresh), *args]) == 0  # not refused as "already exists"


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_over_without_its_metrics(
    tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = [*TINY, *verdict_args(shared_data), "--train.max_steps", "4", "--train.eval_interval", "4",
            "--train.log_interval", "1"]  # fmt: skip
    assert main(["pretrain", "--out", str(run), *args]) == 0
    first = train_records(run)
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    (run / "latest").unlink()
    (run / "best").unlink()
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert train_records(run) == first  # steps 1 to 4 once each, with the same losses
    assert "starting it over from step 0" in capsys.readouterr().out


def test_a_resume_that_finds_checkpoints_but_no_pointer_to_them_deletes_nothing(
    tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = [*TINY, *verdict_args(shared_data), "--train.max_steps", "4", "--train.checkpoint_interval", "2"]
    assert main(["pretrain", "--out", str(run), *args]) == 0
    (run / "latest").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "latest is missing or names no checkpoint" in err and "step-0000004" in err and err.count("\n") == 1
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "checkpoints" / "step-0000004").is_dir()


def test_an_out_directory_under_a_file_is_a_one_line_error(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("not a folder")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["pretrain", "--out", str(out), *TINY, *verdict_args(shared_data), "--train.max_steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: the run directory {out}: {tmp_path / 'afile'} is a file, not a folder\n"


def test_resuming_a_run_of_another_task_names_the_command_that_resumes_it(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "1"]) == 0
    for command in (["finetune", "instruct"], ["finetune", "preference"], ["finetune", "classify"]):
        capsys.readouterr()
        assert main([*command, "--resume", str(run)]) == 2
        expected = f"{run} is a pretrain run; resume it with `gptlab pretrain --resume {run}`"
        assert capsys.readouterr().err == f"error: {expected}\n"
    classify_config = (run / "config.yaml").read_text().replace("task: pretrain", "task: classify")
    (run / "config.yaml").write_text(classify_config)
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is a classify run" in err and f"`gptlab finetune classify --resume {run}`" in err and err.count("\n") == 1
    (run / "config.yaml").write_text(classify_config.replace("task: classify", "task: instruct"))
    assert main(["pretrain", "--resume", str(run)]) == 2
    assert f"{run} is an instruct run; resume it with `gptlab finetune instruct" in capsys.readouterr().err


def test_unknown_field_in_config_file_suggests_closest(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_stepz: 3\n")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--config", str(recipe)]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_losses_bitwise(tmp_path, shared_data):
    env = {**os.environ, "GPTLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = [*TINY, *verdict_args(shared_data), "--train.max_steps", "40", "--train.eval_interval", "10",
              "--train.checkpoint_interval", "1", "--train.log_interval", "1", "--train.threads", "1"]  # fmt: skip
    reference = tmp_path / "reference"
    done = _cli(["pretrain", "--out", str(reference), *common], env)
    assert done.wait(timeout=300) == 0, done.stdout.read()

    killed = tmp_path / "killed"
    for kill_after_step in (7, 23):
        if kill_after_step == 7:
            proc = _cli(["pretrain", "--out", str(killed), *common], env)
        else:
            proc = _cli(["pretrain", "--resume", str(killed)], env)
        deadline = time.time() + 240
        while time.time() < deadline:
            latest = killed / "latest"
            if latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= kill_after_step:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-step or mid-checkpoint, whatever it was doing
        proc.wait()
    resumed = _cli(["pretrain", "--resume", str(killed)], env)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert train_records(killed) == train_records(reference)  # every step's loss, bitwise


def test_init_from_continues_pretraining_from_another_runs_weights(tmp_path, shared_data, monkeypatch):
    import yaml

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    base, adapted = tmp_path / "base", tmp_path / "adapted"
    common = [*TINY, "--train.eval_interval", "10", "--train.log_interval", "1"]
    assert main(["pretrain", "--out", str(base), *common, *verdict_args(shared_data), "--train.max_steps", "30"]) == 0
    source = ["--data.source", str(shared_data / "tinyshakespeare.txt"), "--train.max_steps", "2"]
    assert main(["pretrain", "--out", str(adapted), *source, "--init-from", str(base), "--train.batch_size", "4"]) == 0
    config = yaml.safe_load((adapted / "config.yaml").read_text())
    assert Path(config["init_from"]).is_absolute() and config["model"]["context_length"] == 32
    assert train_records(adapted)[0][1] < train_records(base)[0][1] - 1.0  # starts from trained weights


def test_pretrain_without_arguments_runs_the_demo_recipe():
    """`gptlab pretrain` and `gptlab pretrain --config recipes/demo.yaml` must describe the same run."""
    from gptlab.config import TASK_DEFAULTS, load_config_file, resolve_run_config

    sections = ["model", "data", "train"]
    recipe = load_config_file(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml")
    assert resolve_run_config(recipe, sections) == resolve_run_config(TASK_DEFAULTS["pretrain"], sections)


def test_a_run_on_a_relative_corpus_path_resumes_from_another_directory(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus").mkdir()
    shutil.copy(shared_data / "the-verdict.txt", tmp_path / "corpus" / "story.txt")
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "--data.source", "corpus", "--train.max_steps", "2", "--train.eval_interval", "2"]
    assert main(["pretrain", "--out", "run", *args]) == 0
    assert read_run_config(tmp_path / "run")["data"]["source"] == str(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path / "corpus")
    resume = ["pretrain", "--resume", str(tmp_path / "run"), "--allow-config-change", "--train.max_steps", "3"]
    assert main(resume) == 0


def test_continued_pretraining_refuses_a_shape_or_tokenizer_other_than_its_start(
    tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    assert main(["pretrain", "--out", str(base), *TINY, *verdict_args(shared_data), "--train.max_steps", "1"]) == 0
    common = ["pretrain", "--init-from", str(base), *verdict_args(shared_data), "--train.max_steps", "1"]
    for extra, message in [
        (["--model.n_layer", "3"], "model.n_layer is 3 but 2 in the base run"),
        (["--data.tokenizer", "gpt2"], "data.tokenizer is gpt2 but the run to start from"),
    ]:
        capsys.readouterr()
        assert main([*common, "--out", str(tmp_path / "next"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "next").exists()
    assert main([*common, "--out", str(tmp_path / "next"), "--model.dropout", "0.2"]) == 0
    stored = read_run_config(tmp_path / "next")
    assert stored["model"]["dropout"] == 0.2 and stored["data"]["tokenizer"] == "byte"


def test_resuming_on_edited_text_is_refused_unless_allowed(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shared_data / "the-verdict.txt", corpus / "story.txt")
    run = tmp_path / "run"
    args = [*TINY, "--data.source", str(corpus), "--train.max_steps", "2", "--train.eval_interval", "2"]
    assert main(["pretrain", "--out", str(run), *args]) == 0
    (corpus / "more.txt").write_text("Another page of the story, written after the run began. " * 40)
    resume = ["pretrain", "--resume", str(run)]
    capsys.readouterr()
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"the text of data.source {corpus} changed since " in err and err.count("\n") == 1
    assert main([*resume, "--allow-config-change"]) == 0
    assert "going on with the new text" in capsys.readouterr().out


def test_a_step_size_that_is_no_whole_number_of_batches_and_a_short_warm_up_are_said(
    tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    args = [*TINY, *verdict_args(shared_data), "--train.max_steps", "1", "--train.warmup_steps", "5"]
    assert main(["pretrain", "--out", str(tmp_path / "run"), *args, "--train.tokens_per_step", "300"]) == 0
    out = capsys.readouterr().out  # batches of 4 x 32 tokens: 300 rounds to 2 of them
    assert "train.tokens_per_step 300 is not a whole number of batches: a step is 2 micro-batch(es)" in out
    assert "256 in all" in out and "ends within the warm-up of 5 steps" in out


def test_a_config_for_another_task_and_a_resume_past_max_steps_are_one_line_errors(
    tmp_path, shared_data, capsys, monkeypatch
):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = [*TINY, *verdict_args(shared_data), "--train.max_steps", "2", "--train.eval_interval", "2"]
    assert main(["pretrain", "--out", str(run), *args, "--task", "instruct"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the config's task is instruct, but this command trains pretrain runs; train it with " \
        "`gptlab finetune instruct`\n" and not run.exists()  # fmt: skip
    assert main(["finetune", "classify", "--init-from", str(tmp_path), "--task", "pretrain"]) == 2
    assert "the config's task is pretrain, but this command trains classify runs" in capsys.readouterr().err
    assert main(["finetune", "preference", "--resume", str(run)]) == 2  # e.g. stopped while scoring its reference
    assert "holds no run to resume (no config.yaml" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), *args]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--train.max_steps", "1", "--allow-config-change"]) == 2
    err = capsys.readouterr().err
    assert "is at step 2, past train.max_steps 1; resume with --train.max_steps 2 or more" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "command, shown",
    [
        (
            ["pretrain"],
            {
                "--out": "runs/pretrain",
                "--train.max_steps": "800",
                "--model.n_layer": "demo: 4",
                "--model.vocab_size": "the tokenizer's",
            },
        ),  # fmt: skip
        (
            ["finetune", "instruct"],
            {
                "--out": "runs/instruct",
                "--train.max_steps": "300",
                "--train.learning_rate": "0.0003",
                "--model.dropout": "the base run's",
                "--template": "the base run's, else alpaca",
                "--train.sample_prompts": "none: validation instructions",
            },
        ),  # fmt: skip
        (
            ["finetune", "preference"],
            {"--train.max_steps": "120", "--train.weight_decay": "0.01", "--model.dropout": "0.0"},
        ),  # fmt: skip
        (["finetune", "classify"], {"--out": "runs/classify", "--train.learning_rate": "5e-05"}),
    ],
)
def test_help_shows_each_commands_own_defaults(command, shown, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    options = capsys.readouterr().out.split("options:")[1].split("\n  --")[1:]
    lines = {"--" + text.split()[0]: " ".join(text.split()) for text in options}  # each option's help on one line
    for option, default in shown.items():
        assert re.search(r"\(default: ([^)]*)\)", lines[option]).group(1).endswith(default), lines[option]


def test_a_run_another_command_is_writing_is_refused_and_left_alone(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "2",
            "--train.eval_interval", "2"]  # fmt: skip
    assert main(args) == 0
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"}
    # Another process holds the run, as a training command does while it runs.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from gptlab.checkpoint import lock_run; "
         "lock_run(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        for extra in (["--overwrite"], ["--resume", str(run), "--train.max_steps", "4", "--allow-config-change"]):
            command = [*args, *extra] if extra[0] == "--overwrite" else ["pretrain", *extra]
            assert main(command) == 2
            err = capsys.readouterr().err
            assert f"is being written by another gptlab command (process {holder.pid})" in err and err.count("\n") == 1
        after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".lock"}
        assert after == before  # nothing replaced, truncated or added
    finally:
        holder.kill()
        holder.wait()
    # The holder gone, its lock went with it.
    assert main(["pretrain", "--resume", str(run), "--train.max_steps", "4", "--allow-config-change"]) == 0


def test_damaged_pointers_and_checkpoints_say_how_to_repair_them(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    old_umask = os.umask(0o022)
    try:
        assert main(["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "4",
                     "--train.eval_interval", "2"]) == 0  # fmt: skip
    finally:
        os.umask(old_umask)
    # Ordinary permissions under the umask, as other files get: others may read the run.
    assert (run / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert (run / "checkpoints" / "step-0000004").stat().st_mode & 0o777 == 0o755
    capsys.readouterr()
    generate = ["generate", str(run), "x", "--max-new-tokens", "2"]
    for damaged in (b"../../elsewhere/checkpoints/step-0000004", b"/etc", b"\xff\xfe\x00"):
        (run / "latest").write_bytes(damaged)
        assert main(generate) == 2
        err = capsys.readouterr().err
        assert (
            f"{run / 'latest'} is damaged: it should name one of the run's checkpoint folders; write step-0000004"
            in err
        )
    (run / "latest").write_text("step-0000004")
    weights = run / "checkpoints" / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(generate) == 2
    err = capsys.readouterr().err
    assert f"to go back to the checkpoint before it, write step-0000002 into {run / 'latest'}" in err
    (run / "latest").write_text("step-0000002")
    assert main(generate) == 0


def test_a_file_system_that_refuses_a_write_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import errno

    import gptlab.train

    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(gptlab.train, "pretrain", refused)
    assert main(["pretrain", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: cannot write {tmp_path / 'run' / 'config.yaml'} (Read-only file system); choose a place this user may write to\n"
    )


def test_a_resume_between_log_lines_logs_the_same_mean_losses(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    assert main(["pretrain", "--out", str(run), *TINY, *verdict_args(shared_data), "--train.max_steps", "10",
                 "--train.eval_interval", "10", "--train.log_interval", "5", "--train.checkpoint_interval", "2",
                 "--train.keep_checkpoints", "10"]) == 0  # fmt: skip
    shutil.copytree(run, resumed)
    (resumed / "latest").write_text("step-0000006")  # as if killed after step 6, in the middle of a window
    assert main(["pretrain", "--resume", str(resumed), "--out", str(resumed)]) == 0
    assert train_records(resumed) == train_records(run) and [s for s, _ in train_records(run)] == [5, 10]
