"""The `gptlab` command line: one subcommand per job. The only place that prints and exits.

Heavy imports (torch, numpy) happen inside the commands, so `gptlab --help` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable

from gptlab.config import FINETUNE_MODEL_FIELDS
from gptlab.errors import GptlabError

# name -> (help, add_arguments, run); filled by the @command decorator below.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def command_group(name: str, help: str):
    """Register `gptlab NAME ACTION ...`; returns a decorator like @command that registers one action."""
    actions: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

    def add_actions(parser: argparse.ArgumentParser) -> None:
        subparsers = parser.add_subparsers(dest=f"{name}_action", metavar="ACTION", required=True)
        for action, (help_text, add_arguments, run) in actions.items():
            sub = subparsers.add_parser(action, help=help_text, description=help_text)
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
            add_arguments(sub)
            sub.set_defaults(run=run, _parser=sub)

    def action(action_name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            actions[action_name] = (help_text, add_arguments, run)
            return run

        return register

    COMMANDS[name] = (help, add_actions, lambda args: 0)  # argparse demands an action, so this never runs
    return action


# Command groups whose actions are registered further down, e.g. @finetune("instruct", help, add_arguments).
finetune = command_group("finetune", "finetune a trained model for a task (one action per kind of task)")
evaluate = command_group("eval", "evaluate a trained model (one action per kind of evaluation)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptlab",
        description="Build, train, finetune, evaluate, export and serve GPT-style language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        add_arguments(sub)
        sub.set_defaults(run=run, _parser=sub)
    return parser


def _unknown_option_error(parser: argparse.ArgumentParser, unknown: list[str]) -> GptlabError:
    """A one-line error for an unknown option, suggesting the closest known one."""
    import difflib

    option = next((arg for arg in unknown if arg.startswith("-")), unknown[0]).split("=")[0]
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f"; see '{parser.prog} --help'"
    return GptlabError(f"unknown option or argument {option!r}{hint}")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _stdout_on_rank_zero():
    """Under torchrun only rank 0 prints progress: the other ranks would repeat it."""
    if _is_rank_zero():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "run", None) is None:
        if unknown:
            parser.parse_args(argv)  # argparse's own message and exit code
        parser.print_help()
        return 0
    try:
        unknown = _late_positionals(args, unknown)
        if unknown:
            raise _unknown_option_error(args._parser, unknown)
        with _stdout_on_rank_zero():
            status = int(args.run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush at exit
            return status
    except BrokenPipeError:
        # The reader left (`gptlab ... | head`): stop quietly, as Unix tools do.
        _discard_stdout()
        return 0
    except GptlabError as exc:
        if args.debug:
            raise
        if _is_rank_zero():  # every rank raises it: gptlab.distributed brings one rank's mistakes to all
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The file system said no (read-only, full, no permission): one line naming the file, as for bad input.
        if args.debug or exc.errno not in _FILE_SYSTEM_ERRORS:
            raise
        if _is_rank_zero():
            print(f"error: {file_system_error(exc)}", file=sys.stderr)
        return 2


# errno values of a file system refusing a write: the user's to fix, not a bug to trace.
_FILE_SYSTEM_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT}


def file_system_error(exc: OSError) -> str:
    what = f" {exc.filename}" if exc.filename else ""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = "free some space and run the command again" if full else "choose a place this user may write to"
    return f"cannot write{what} ({os.strerror(exc.errno)}); {hint}"


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's flush at exit finds no closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a file descriptor (a test's captured stdout): nothing is left to flush
        pass


def _late_positionals(args: argparse.Namespace, unknown: list[str]) -> list[str]:
    """Give words written after the options (`gptlab classify RUN --json "text"`) to the command's
    optional positional (argparse fills it, empty, before it sees the options); return what is left."""
    words = [word for word in unknown if not word.startswith("-")]
    if not words or len(words) != len(unknown):
        return unknown
    for action in args._parser._actions:
        if action.option_strings or action.nargs not in ("*", "?"):
            continue
        current = getattr(args, action.dest)
        if action.nargs == "*":
            setattr(args, action.dest, [*(current or []), *words])
            return []
        if current == action.default and len(words) == 1:
            setattr(args, action.dest, words[0])
            return []
    return unknown


# ---------------------------------------------------------------- gptlab size


def resolve_model_config(name_or_path: str):
    """The GPTConfig `gptlab size` reports: a preset's, a run directory's, the model a run config (a recipe)
    trains, or a model config's (GPTConfig's fields, perhaps over a `preset`)."""
    return resolve_size_target(name_or_path)[0]


def resolve_size_target(name_or_path: str):
    """(GPTConfig, run config) of what `gptlab size` reports; the run config, of a run directory or of the
    run a finetuning recipe would make, says what the model has beside the GPT (a classifier's head,
    LoRA's adapters, what trains: `sizing.run_model`), and is None for a preset or a pretraining recipe."""
    from pathlib import Path

    from gptlab.config import PRESETS, get_preset

    path = Path(name_or_path)
    if name_or_path in PRESETS or not path.exists():
        return get_preset(name_or_path), None
    if path.is_dir():
        from gptlab.checkpoint import read_run_config, run_dir_of

        return _run_model_config(path), read_run_config(run_dir_of(path))
    return _config_file_model(path)


def _run_model_config(run, finetuning: dict | None = None, source: str = ""):
    """The model of a run directory or checkpoint folder, with a finetuning run's changes to it (dropout)."""
    from pathlib import Path

    from gptlab.checkpoint import read_run_config, run_dir_of
    from gptlab.config import GPTConfig, config_from_dict, finetuning_model_values

    model = finetuning_model_values(read_run_config(run_dir_of(Path(run)))["model"], finetuning, str(run))
    return config_from_dict(GPTConfig, model, "model.", source)


def _config_file_model(path):
    """(GPTConfig, run config or None) of a config file: a model config's own; a finetuning run's, its
    init_from run's (a model known only from that run) with what the finetuning adds to it; a pretraining
    run's, its preset and model section with its tokenizer's vocabulary, as `gptlab pretrain --config`
    would make it."""
    import dataclasses
    from pathlib import Path

    from gptlab.config import (
        RUN_FIELDS,
        TASK_DEFAULTS,
        check_run_values,
        load_config_file,
        resolve_run_config,
        section_types,
    )

    values = load_config_file(path)
    if not values:
        raise GptlabError(
            f"{path} holds no config; give a preset name, a run, a run config (a recipe) or a model config"
        )
    if not (set(values) - {"preset"}) & (set(RUN_FIELDS) | set(section_types())):  # GPTConfig's fields
        model = {key: value for key, value in values.items() if key != "preset"}
        values = check_run_values({"preset": values.get("preset"), "model": model}, source=str(path))
        return resolve_run_config(values, ["model"])["model"], None
    values = check_run_values(values, source=str(path))
    if values.get("init_from"):
        if not Path(values["init_from"]).exists():
            raise GptlabError(
                f"{path} starts from the run {values['init_from']}, which is not here, and its model is that "
                "run's; make the run first, or size the run or its preset"
            )
        # As every run starting from another does: its model, of which only dropout may change.
        config = _run_model_config(values["init_from"], values.get("model"), str(path))
        return config, _finetuning_run_config(values, config)
    if values.get("task", "pretrain") != "pretrain":
        raise GptlabError(f"{path} finetunes a model but names no run to start from (init_from), whose model it is")
    config = resolve_run_config({**TASK_DEFAULTS["pretrain"], **values}, ["model", "data"])
    return dataclasses.replace(config["model"], vocab_size=_pretraining_vocab_size(config["data"])), None


def _finetuning_run_config(values: dict, model) -> dict | None:
    """What the run a finetuning recipe makes records about its model: the task, the model, the task's
    section (a classifier's labels: the data's when the recipe names none) and LoRA's settings when
    adapters train."""
    import dataclasses

    from gptlab.config import LoRAConfig, config_from_dict, config_to_dict

    task = values.get("task", "pretrain")
    if task == "pretrain":
        return None
    section = dict(values.get(task) or {})
    run_config = {"task": task, "model": dataclasses.asdict(model), task: section}
    if section.get("trainable") == "lora":
        run_config["lora"] = config_to_dict(config_from_dict(LoRAConfig, values.get("lora") or {}, "lora."))
    if task == "classify" and not section.get("labels"):
        from gptlab.classify import prepare_classification_data
        from gptlab.config import ClassifyConfig

        section["labels"] = prepare_classification_data(config_from_dict(ClassifyConfig, section, "classify.")).labels
    return run_config


def _pretraining_vocab_size(data) -> int:
    """The vocabulary pretraining gives a new model: its tokenizer's, known without building it (a bpe one
    is trained to data.vocab_size; GPTConfig's default is GPT-2's)."""
    from gptlab.config import GPTConfig
    from gptlab.tokenizer import ByteTokenizer

    return {"bpe": data.vocab_size, "byte": ByteTokenizer().vocab_size}.get(data.tokenizer, GPTConfig.vocab_size)


def _size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL_OR_CONFIG", help="a preset name (gpt2, gpt3-175b, ...), a config file or a run"
    )
    parser.add_argument(
        "--tokens", type=float, default=300e9, help="training tokens for the time estimate (default 300e9)"
    )
    parser.add_argument(
        "--flops", type=float, default=989e12, help="device peak FLOP/s (default 989e12, an H100's bf16 dense)"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("size", "parameters, FLOPs, memory and training time of a model", _size_arguments)
def run_size(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from gptlab.sizing import format_size_report, run_model, size_report

    if not 0 < args.mfu <= 1:
        raise GptlabError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.flops <= 0 or args.tokens <= 0:
        raise GptlabError("--flops and --tokens must be positive")
    config, run_config = resolve_size_target(args.model)
    report = size_report(config, args.tokens, args.flops, args.mfu, run_model(run_config) if run_config else None)
    if args.json:
        counts = report["parameters"]
        report["parameters"] = {
            **dataclasses.asdict(counts),
            "total": counts.total,
            "non_embedding": counts.non_embedding,
        }
        report["config"] = dataclasses.asdict(report["config"])
        report["run"] = dataclasses.asdict(report["run"])
        print(json.dumps(report, indent=2))
    else:
        print(format_size_report(report))
    return 0


# ---------------------------------------------------------------- gptlab lora


def _lora_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="lora_action", metavar="ACTION", required=True)
    merge_help = "fold a LoRA run's adapters into its base weights and write a plain run"
    merge = actions.add_parser("merge", help=merge_help, description=merge_help)
    merge.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    merge.add_argument("run_dir", metavar="RUN", help="the LoRA run directory or checkpoint folder")
    merge.add_argument("out", metavar="OUT_RUN", help="the new run directory to write")
    merge.add_argument(
        "--checkpoint", choices=["latest", "best"], default="latest", help="which checkpoint of RUN (default latest)"
    )


@command("lora", "low-rank adapters: merge a LoRA run into a plain run", _lora_arguments)
def run_lora(args: argparse.Namespace) -> int:
    from gptlab.lora import merge_run

    checkpoint = merge_run(args.run_dir, args.out, which=args.checkpoint)
    print(f"merged {args.run_dir} into {checkpoint}")
    return 0


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", metavar="RUN", nargs="+", help="run directories whose metrics.jsonl to draw")
    parser.add_argument("--out", default="runs.png", help="the PNG to write (default runs.png)")
    parser.add_argument("--x", choices=["step", "tokens", "time"], default="tokens", help="x axis (default tokens)")
    parser.add_argument(
        "--metric", default="val_loss",
        help="what each evaluation logged: val_loss (default, with the training loss faintly), bits_per_byte, "
        "perplexity, reward_accuracy, accuracy, ...",
    )  # fmt: skip


@command("plot", "draw several runs' curves in one PNG, to compare them", _plot_arguments)
def run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.train import METRICS_FILE, MetricsLog, plot_runs

    runs = {}
    for run in args.runs:
        path = Path(run) / METRICS_FILE
        if not path.is_file():
            raise GptlabError(f"{run} has no {METRICS_FILE}; give run directories written by gptlab")
        runs[run] = MetricsLog(path).read()
    summary = plot_runs(runs, Path(args.out), args.x, args.metric)
    width = max(len(run) for run in summary)
    print(f"{'run':<{width}}  {args.metric + ' (last)':>18}  {'best':>10}")
    for run, (last, best) in summary.items():
        print(f"{run:<{width}}  {last:>18.4f}  {best:>10.4f}")
    print(f"plot: {args.out}")
    return 0


@contextlib.contextmanager
def progress_bar(description: str, unit: str):
    """A progress(done, total) callback drawing a bar with rate and time left on stderr (when it is a terminal)."""
    from tqdm import tqdm

    scale = unit == "B"
    with tqdm(total=0, unit=unit, unit_scale=scale, desc=description, disable=not sys.stderr.isatty()) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


# ---------------------------------------------------------------- run configs on the command line


def add_config_arguments(
    parser: argparse.ArgumentParser, sections: list[str], run_fields: bool = True, task: str | None = None
) -> None:
    """One `--section.field` option per config field, documented from the dataclass (a "section.field"
    entry in `sections`: that field only); `run_fields` adds the top-level fields (--init-from, --out, ...)
    for commands that make a run. The defaults shown are the `task`'s own where it has them (TASK_DEFAULTS)."""
    import dataclasses

    from gptlab.config import RUN_FIELDS, TASK_DEFAULTS, section_types

    task_defaults = TASK_DEFAULTS.get(task or "", {})
    types_by_name = section_types()
    parser.add_argument("--config", metavar="FILE", help="YAML run config (a recipe); options below override it")
    for name, help_text in RUN_FIELDS.items() if run_fields else ():
        flag = "--out" if name == "out_dir" else f"--{name.replace('_', '-')}"
        shown = DERIVED_DEFAULTS.get((task_defaults.get("task"), name)) or task_defaults.get(name)
        if shown:
            help_text += f" (default: {shown})"
        parser.add_argument(flag, dest=f"run.{name}", default=argparse.SUPPRESS, help=help_text)
    for entry in sections:
        section, _, only = entry.partition(".")
        cls = types_by_name[section]
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for f in dataclasses.fields(cls):
            if only and f.name != only:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                metavar="V",
                default=argparse.SUPPRESS,
                help=f"{f.metadata.get('help', '')} (default: {_shown_default(task_defaults, section, f.name, default)})",
            )
    if "train" in sections:
        parser.add_argument(
            "--activation-checkpointing", dest="train.activation_checkpointing", action="store_const", const="true",
            default=argparse.SUPPRESS, help="same as --train.activation_checkpointing true",
        )  # fmt: skip


def collect_config(args: argparse.Namespace, base: dict | None = None) -> tuple[dict, dict]:
    """(run config values, explicit overrides) from --config, the base and the dotted options."""
    from gptlab.config import load_run_config, parse_value, section_types, set_dotted

    values = dict(base or {})
    if getattr(args, "config", None):
        for key, value in load_run_config(args.config).items():
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    overrides: dict = {}
    types_by_name = section_types()
    for dest, text in vars(args).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        value = text if section == "run" else parse_value(types_by_name[section], name, text, f"{section}.")
        set_dotted(overrides, name if section == "run" else dest, value)
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values, overrides


# ---------------------------------------------------------------- gptlab pretrain


# The model options of the finetuning commands: the other model fields fix the shapes of the weights they load.
FINETUNE_MODEL_OPTIONS = [f"model.{field}" for field in FINETUNE_MODEL_FIELDS]


# Defaults a command works out rather than sets, as `--help` says them.
DERIVED_DEFAULTS = {
    ("pretrain", "model.vocab_size"): "the tokenizer's",
    ("instruct", "template"): "the base run's, else alpaca",
    ("preference", "template"): "the base run's, else alpaca",
    ("instruct", "train.sample_prompts"): "none: validation instructions",
    ("preference", "train.sample_prompts"): "none: validation instructions",
}


def _shown_default(task_defaults: dict, section: str, name: str, default) -> str:
    """The default `--help` shows for a field: one the command works out (DERIVED_DEFAULTS), the task's own,
    else for the model the preset's (pretraining) or the base run's (finetuning, whose weights fix the
    model), else the dataclass's."""
    derived = DERIVED_DEFAULTS.get((task_defaults.get("task"), f"{section}.{name}"))
    if derived:
        return derived
    if name in task_defaults.get(section, {}):
        return repr(task_defaults[section][name])
    if section == "model" and "preset" in task_defaults:
        from gptlab.config import get_preset

        preset = task_defaults["preset"]
        return f"the preset's; {preset}: {getattr(get_preset(preset), name)!r}"
    if section == "model" and task_defaults:
        return "the base run's"
    return repr(default)


def training_arguments(
    parser: argparse.ArgumentParser, task: str, sections: list[str], lora_help: str | None = None
) -> None:
    """The options every training command shares: resume, overwrite, config changes, `--lora`, the sections
    (their help showing the `task`'s defaults)."""
    if lora_help:
        parser.add_argument("--lora", action="store_true", help=lora_help)
    parser.add_argument("--resume", metavar="RUN", help="continue a run exactly where its last checkpoint left it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument(
        "--allow-config-change", action="store_true", help="resume even though options change the run's config"
    )
    add_config_arguments(parser, sections, task=task)


def training_run(args: argparse.Namespace, start, trainable_section: str | None = None):
    """Gather a training command's config (the run's own when resuming) and call `start` with it."""
    from gptlab.checkpoint import check_resumable, read_run_config

    base = {}
    if args.resume:
        check_resumable(args.resume)
        base = read_run_config(args.resume)
        base["out_dir"] = args.resume
    values, _ = collect_config(args, base)
    if trainable_section and getattr(args, "lora", False):
        values[trainable_section] = {**values.get(trainable_section, {}), "trainable": "lora"}
    return start(
        values, resume=bool(args.resume), overwrite=args.overwrite, allow_config_change=args.allow_config_change,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    training_arguments(parser, "pretrain", ["model", "data", "train"])


@command("pretrain", "pretrain a GPT by next-token prediction (no arguments: the demo on the embedded corpus)",
         _pretrain_arguments)  # fmt: skip
def run_pretrain(args: argparse.Namespace) -> int:
    from gptlab.train import pretrain

    result, run_dir = training_run(args, pretrain)
    print(f"\ndone: {result.step} steps in {result.elapsed:.0f} s ({result.tokens_per_second:,.0f} tokens/s)")
    if result.last_eval:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items()))
    for sample in result.samples:
        print(f"sample: {sample}")
    print(
        f"run directory: {run_dir}\nloss curve:    {run_dir / 'loss.png'}\nmetrics:       {run_dir / 'metrics.jsonl'}"
    )
    print(f'generate with: gptlab generate {run_dir} "The"')
    return 0


# ---------------------------------------------------------------- gptlab generate


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per GenerationConfig field (`--top-k 50`, `--stop TEXT` repeatable), plus device and dtype."""
    import dataclasses

    from gptlab.config import GenerationConfig

    group = parser.add_argument_group("decoding (GenerationConfig)")
    for f in dataclasses.fields(GenerationConfig):
        flag = f"--{f.name.replace('_', '-')}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if f.name == "stop":
            group.add_argument(flag, action="append", metavar="TEXT", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, metavar="V", default=argparse.SUPPRESS, help=help_text)
    group.add_argument("--greedy", action="store_true", help="pick the most likely token (same as --temperature 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), fp32 or bf16")


def _generation_config(args: argparse.Namespace, **overrides):
    """The GenerationConfig the options describe."""
    import dataclasses

    from gptlab.config import GenerationConfig, parse_value

    values = {}
    for f in dataclasses.fields(GenerationConfig):
        if f.name in vars(args):
            text = getattr(args, f.name)
            values[f.name] = text if f.name == "stop" else parse_value(GenerationConfig, f.name, text)
    if args.greedy:
        values["temperature"] = 0.0
    return GenerationConfig(**{**values, **overrides})


class _WarningsToStderr:
    """Within it, Python warnings (a truncated prompt, say) print as one `warning: ...` line."""

    def __enter__(self):
        import warnings

        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        warnings.showwarning = lambda message, *rest, **kw: print(f"warning: {message}", file=sys.stderr)

    def __exit__(self, *exc_info):
        return self._saved.__exit__(*exc_info)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_OR_CHECKPOINT", help="a run directory or a checkpoint folder")
    parser.add_argument("prompt", nargs="?", help="the text to continue (empty: start from end-of-text)")
    parser.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE ('-': standard input)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions of the prompt (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument(
        "--template",
        help="format the prompt as an instruction in this template (alpaca, chat; 'run': the run's own); "
        "default: plain continuation",
    )
    _generation_arguments(parser)


def _templated_prompt(prompt: str, template: str | None, run) -> str:
    """The prompt as the model reads it: as it is, or as an instruction in a template."""
    from gptlab.templates import format_instruction

    own = run.config.get("template")
    if template is None:
        if own:
            print(f"note: this run was finetuned on the {own} template; --template run formats the prompt as an "
                  "instruction", file=sys.stderr)  # fmt: skip
        return prompt
    if template == "run":
        if not own:
            raise GptlabError(f"{run.run_dir} was not finetuned on a template; name one (--template alpaca or chat)")
        template = own
    return format_instruction(template, prompt)


def _read_prompt(args: argparse.Namespace) -> str:
    from pathlib import Path

    if args.prompt_file is not None and args.prompt is not None:
        raise GptlabError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is None:
        return args.prompt or ""
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise GptlabError(f"prompt file {path} not found")
    return path.read_text()


@command("generate", "continue a prompt with a trained model, streaming the text", _generate_arguments)
def run_generate(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from gptlab.generate import load_generator, stream

    if args.num_samples < 1:
        raise GptlabError(f"--num-samples must be at least 1, got {args.num_samples}")
    prompt = _read_prompt(args)
    config = _generation_config(args)
    run = load_generator(args.run_dir, args.device, args.dtype)
    prompt = _templated_prompt(prompt, args.template, run)
    completions = []
    with _WarningsToStderr():
        for i in range(args.num_samples):
            # Sample i is seeded with seed + i: reproducible, and the samples differ.
            seed = None if config.seed is None else config.seed + i
            pieces = stream(run.model, run.tokenizer, prompt, dataclasses.replace(config, seed=seed))
            if args.json:
                completions.append("".join(pieces))
                continue
            if i:
                print("\n" + "-" * 40)
            sys.stdout.write(prompt)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    if args.json:
        result = {
            "run": str(run.run_dir),
            "checkpoint": str(run.checkpoint),
            "prompt": prompt,
            "completions": completions,
            "config": dataclasses.asdict(config),
        }
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


# ---------------------------------------------------------------- gptlab chat


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a run directory or a checkpoint folder")
    parser.add_argument("--system", help="system message (default: the template's own)")
    parser.add_argument("--template", help="prompt template (default: the run's; none for plain continuation)")
    _generation_arguments(parser)


CHAT_HELP = "/reset forgets the conversation, /quit (or Ctrl-D) leaves"


@command("chat", "talk to an instruction-tuned model (a plain model continues your text)", _chat_arguments)
def run_chat(args: argparse.Namespace) -> int:
    from gptlab.generate import Chat, load_generator

    run = load_generator(args.run_dir, args.device, args.dtype)
    template = args.template or run.config.get("template")
    chat = Chat(run.model, run.tokenizer, _generation_config(args), template, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        mode = f"template {template}" if template else "no template: free continuation"
        print(f"chatting with {run.run_dir} ({mode}); {CHAT_HELP}", file=sys.stderr)
    with _WarningsToStderr():
        while True:
            try:
                message = input("> " if interactive else "")
            except EOFError:
                break
            if message.strip() in ("/quit", "/exit"):
                break
            if message.strip() == "/reset":
                chat.reset()
                continue
            if not message.strip():
                continue
            if message.startswith("/") and " " not in message.strip():  # a mistyped command, not a message
                print(f"unknown command {message.strip()}; {CHAT_HELP}", file=sys.stderr)
                continue
            for piece in chat.send(message):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- gptlab prepare


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from gptlab.config import DataConfig

    defaults = DataConfig()
    parser.add_argument(
        "source",
        nargs="?",
        default="",
        help="text file, folder of text files, .jsonl with a text field, or data set name "
        "(default: the embedded Python documentation)",
    )
    parser.add_argument("--tokenizer", choices=("gpt2", "bpe", "byte"), default=defaults.tokenizer)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help="ids of a trained bpe tokenizer (default %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share held out for validation (default %(default)s)",
    )
    parser.add_argument("--out", help="folder for the shards (default: the cache, GPTLAB_CACHE/prepared/<key>)")
    parser.add_argument(
        "--encoding-errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: stop with its place (strict) or substitute U+FFFD (replace)",
    )
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per core, up to 8)")
    parser.add_argument("--chunk-mb", type=float, default=4.0, help="text per tokenizing task in MB (default 4)")
    parser.add_argument("--list", action="store_true", help="list the named data sets and exit")


@command("prepare", "tokenize a corpus into train/val token shards on disk", _prepare_arguments)
def run_prepare(args: argparse.Namespace) -> int:
    import time

    from gptlab.config import DataConfig
    from gptlab.data import prepare_corpus, short_vocabulary_note

    if args.list:
        _print_datasets()
        return 0
    if args.workers < 0 or args.chunk_mb <= 0:
        raise GptlabError("--workers must be 0 or more and --chunk-mb positive")
    if args.out:
        from gptlab.checkpoint import check_folder_path

        check_folder_path(args.out, "--out")
    config = DataConfig(
        source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction
    )
    started = time.perf_counter()
    with progress_bar("tokenizing", "B") as progress:
        corpus = prepare_corpus(
            config,
            progress=progress,
            out=args.out,
            chunk_bytes=int(args.chunk_mb * 2**20),
            workers=args.workers or None,
            encoding_errors=args.encoding_errors,
        )
    meta, tokenizer = corpus.meta, corpus.tokenizer
    verb = "reused the shards of" if corpus.reused else "prepared"
    print(
        f"{verb} {meta['source']} with the {tokenizer.kind} tokenizer ({tokenizer.vocab_size:,} ids) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    note = short_vocabulary_note(config, tokenizer)
    if note:
        print(f"  note: {note}")
    for name in ("train", "val"):
        tokens, size = meta[f"{name}_tokens"], meta[f"{name}_bytes"]
        print(f"  {name:5s} {tokens:>13,} tokens  {size:>14,} bytes  {size / max(tokens, 1):.2f} bytes/token")
    print(f"  split  {meta['split']} (val fraction {meta['val_fraction']})")
    print(f"  shards {corpus.directory}/{{train,val}}.bin ({meta['dtype']}), meta.json, tokenizer")
    return 0


def _print_datasets() -> None:
    from gptlab.download import DATASETS, is_available

    for name, dataset in DATASETS.items():
        where = "here" if is_available(name) else "download"
        print(f"{name:24s} {dataset.use:9s} {where:8s} {dataset.description}")


# ---------------------------------------------------------------- gptlab import / export

importing = command_group("import", "make a gptlab run of GPT-2's published weights or a transformers directory")


def _import_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", metavar="RUN", help=f"the run directory to create (default {default_out})")
    parser.add_argument("--force", action="store_true", help="replace RUN if it holds an earlier import")
    parser.add_argument(
        "--dropout", type=float, metavar="P", help="dropout for later finetuning (default: config.json's resid_pdrop)"
    )


def _import_gpt2_arguments(parser: argparse.ArgumentParser) -> None:
    from gptlab.config import PRESETS

    parser.add_argument(
        "--size",
        default="gpt2",
        choices=[name for name in PRESETS if name.startswith("gpt2")],
        help="which GPT-2 (default gpt2: 124M parameters)",
    )
    _import_common_arguments(parser, "runs/SIZE")


@importing("gpt2", "download GPT-2's published weights (once, into the cache) and make a run of them",
           _import_gpt2_arguments)  # fmt: skip
def run_import_gpt2(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.interop import import_gpt2

    run = import_gpt2(args.size, args.out or Path("runs") / args.size, args.force, dropout=args.dropout)
    print(f"imported {args.size} into {run}; try: gptlab generate {run} 'Hello'")
    return 0


def _import_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the directory holding config.json and the weights")
    parser.add_argument(
        "--tokenizer",
        choices=["auto", "gpt2", "bpe", "byte"],
        default="auto",
        help="the model's tokenizer (auto: the one a gptlab export recorded, GPT-2's, or DIR/tokenizer.json)",
    )
    _import_common_arguments(parser, "runs/DIR")


@importing("hf", "make a run of a local transformers GPT-2 directory (safetensors, or pytorch_model.bin)",
           _import_hf_arguments)  # fmt: skip
def run_import_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptlab.checkpoint import read_run_config
    from gptlab.interop import import_hf

    out = args.out or Path("runs") / Path(args.directory).resolve().name
    run = import_hf(args.directory, out, args.tokenizer, args.force, dropout=args.dropout)
    if read_run_config(run)["task"] == "classify":
        print(f"imported {args.directory} into {run} (a classifier); try: gptlab classify {run} 'Hello'")
    else:
        print(f"imported {args.directory} into {run}; try: gptlab generate {run} 'Hello'")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a run directory or a checkpoint folder")
    parser.add_argument("out", metavar="OUT_DIR", help="the transformers directory to write")
    parser.add_argument(
        "--checkpoint", choices=["latest", "best"], default="latest", help="which checkpoint of RUN (default latest)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier export")


@command("export", "write a run as a transformers directory (from_pretrained loads it)", _export_arguments)
def run_export(args: argparse.Namespace) -> int:
    import json

    from gptlab.interop import HF_CONFIG, export_run

    out = export_run(args.run_dir, args.out, which=args.checkpoint, force=args.force)
    (architecture,) = json.loads((out / HF_CONFIG).read_text())["architectures"]
    auto = "AutoModelForSequenceClassification" if "SequenceClassification" in architecture else "AutoModelForCausalLM"
    print(f"exported {args.run_dir} to {out} ({architecture}); transformers loads it with {auto}.from_pretrained")
    return 0


# ---------------------------------------------------------------- gptlab finetune instruct


def _instruct_arguments(parser: argparse.ArgumentParser) -> None:
    training_arguments(
        parser,
        "instruct",
        [*FINETUNE_MODEL_OPTIONS, "train", "instruct", "lora"],
        "train low-rank adapters only (--instruct.trainable lora; see --lora.*)",
    )


@finetune("instruct", "teach a trained model to follow instructions (Alpaca-style or chat records)",
          _instruct_arguments)  # fmt: skip
def run_finetune_instruct(args: argparse.Namespace) -> int:
    from collections import Counter

    from gptlab.instruct import finetune_instruct

    result = training_run(args, finetune_instruct, "instruct")
    run_dir, final = result.run_dir, result.final_eval
    print(f"\ndone: {result.train.step} steps in {result.train.elapsed:.0f} s")
    if final:  # empty when a resumed run had finished already: no step ran
        start = f"{result.start_eval['val_loss']:.4f} -> " if result.start_eval else ""
        print(f"response-only validation loss: {start}{final['val_loss']:.4f} (perplexity {final['perplexity']:.2f})")
    finishes = Counter(r["finish"] for r in result.responses)
    print(
        f"test responses: {len(result.responses)} in {result.responses_file} ({finishes['end_of_text']} ended at "
        f"end-of-text, {finishes['stop_string']} began another turn, {finishes['length']} hit the length limit)"
    )
    for record in result.responses[:2]:
        asked = record.get("instruction") or record["messages"][-2]["content"]
        print(f"example: {asked!r} -> {record['response']!r}")
    print(f"run directory: {run_dir}\nchat with:     gptlab chat {run_dir}")
    print(f"judge with:    gptlab eval judge {run_dir} --endpoint http://127.0.0.1:11434 --model llama3.1")
    return 0


# ---------------------------------------------------------------- gptlab finetune preference


def _preference_arguments(parser: argparse.ArgumentParser) -> None:
    training_arguments(
        parser,
        "preference",
        [*FINETUNE_MODEL_OPTIONS, "train", "preference", "lora"],
        "train low-rank adapters only (--preference.trainable lora)",
    )


@finetune("preference", "tune a model to prefer chosen over rejected responses (DPO)", _preference_arguments)
def run_finetune_preference(args: argparse.Namespace) -> int:
    from gptlab.preference import finetune_preference

    result = training_run(args, finetune_preference, "preference")
    run_dir, start, final, test = result.run_dir, result.start_eval, result.final_eval, result.test_metrics
    print(f"\ndone: {result.train.step} steps in {result.train.elapsed:.0f} s")
    reported = (("DPO loss", "val_loss"), ("reward accuracy", "reward_accuracy"), ("reward margin", "reward_margin"))
    if final:  # empty when a resumed run had finished already: no step ran
        for name, key in reported:
            before = f"{start[key]:.4f} -> " if start else ""
            print(f"validation {name}: {before}{final[key]:.4f}")
    if test:
        print(
            f"test split: reward accuracy {test['reward_accuracy']:.2%}, margin {test['reward_margin']:.4f} "
            f"(chosen {test['chosen_reward']:+.4f}, rejected {test['rejected_reward']:+.4f}) over "
            f"{len(result.responses)} pairs"
        )
    print(f"test responses: {len(result.responses)} in {result.responses_file}")
    print(f"run directory: {run_dir}\nchat with:     gptlab chat {run_dir}")
    print(f"judge with:    gptlab eval judge {run_dir} --endpoint http://127.0.0.1:11434 --model llama3.1")
    return 0


# ---------------------------------------------------------------- gptlab eval judge


def _judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "responses", metavar="RUN_OR_FILE", help="an instruction run (its test_responses.json) or a responses JSON file"
    )
    parser.add_argument(
        "--endpoint", required=True,
        help="an OpenAI-compatible server or API base: http://127.0.0.1:11434 (Ollama), http://127.0.0.1:8080 "
        "(llama.cpp), https://api.openai.com/v1",
    )  # fmt: skip
    parser.add_argument("--model", required=True, help="the judge model's name on that server, e.g. llama3.1")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable holding an API key (Bearer token)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply (default 120)")
    parser.add_argument("--limit", type=int, help="judge only the first N responses")


@evaluate("judge", "score an instruction run's test responses 0-100 with a judge model behind an OpenAI-compatible "
          "endpoint", _judge_arguments)  # fmt: skip
def run_eval_judge(args: argparse.Namespace) -> int:
    import os

    from gptlab.judge import judge_run

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise GptlabError(f"environment variable {args.api_key_env} is not set; export the API key in it")
    if args.limit is not None and args.limit < 1:
        raise GptlabError(f"--limit must be at least 1, got {args.limit}")

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"judged {done}/{total}", file=sys.stderr, flush=True)

    result, scores_file, histogram_file = judge_run(
        args.responses, args.endpoint, args.model, api_key, args.timeout, args.limit, progress
    )
    print(f"mean score: {result.mean:.1f} / 100 over {len(result.scores)} responses ({result.model})")
    if result.unscored:
        print(f"warning: {result.unscored} replies held no score from 0 to 100 (see {scores_file})", file=sys.stderr)
    print("histogram: " + ", ".join(f"{span}: {n}" for span, n in result.histogram().items()))
    print(f"scores:    {scores_file}\nplot:      {histogram_file}")
    return 0


# ---------------------------------------------------------------- gptlab eval perplexity


def _scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every scoring of a language model shares: the run, where and how it runs, JSON."""
    parser.add_argument("run_path", metavar="RUN", help="a run directory or checkpoint folder (a language model)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), fp32 or bf16")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    _scoring_arguments(parser)
    parser.add_argument(
        "--data", metavar="SOURCE",
        help="text file, folder, .jsonl or named data set (default: the text the run was trained on)",
    )  # fmt: skip
    parser.add_argument(
        "--split", choices=["val", "train", "all"], default="val",
        help="which part of the text: the held-out validation part (default), the training part, or all",
    )  # fmt: skip
    parser.add_argument("--stride", type=int, help="positions each window moves (default: the context: no overlap)")
    parser.add_argument("--context", type=int, help="window length (default: the model's context length)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (default: all)")


@evaluate("perplexity", "loss, perplexity and bits per byte of a language model on held-out text",
          _perplexity_arguments)  # fmt: skip
def run_eval_perplexity(args: argparse.Namespace) -> int:
    import json

    from gptlab.evaluate import score_run

    for name in ("stride", "context", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GptlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_tokens < 0:
        raise GptlabError(f"--max-tokens must be 0 (all) or positive, got {args.max_tokens}")
    with progress_bar("scoring", "tok") as progress:
        score = score_run(
            args.run_path, args.data, args.split, args.stride, args.context, args.batch_size, args.max_tokens,
            args.device, args.dtype, progress,
        )  # fmt: skip
    if args.json:
        print(json.dumps(score.as_dict()))
        return 0
    extra = score.extra
    print(
        f"{extra['source']} ({extra['split']} split, {score.tokens:,} tokens, {extra['tokenizer']} tokenizer, "
        f"context {extra['context']}, stride {extra['stride']})"
    )
    bpb = f" | bits per byte {score.bits_per_byte:.4f}" if score.bits_per_byte is not None else ""
    print(f"loss {score.loss:.4f} | perplexity {score.perplexity:.2f}{bpb} | {score.seconds:.1f} s")
    return 0


# ---------------------------------------------------------------- gptlab eval choice


def _choice_arguments(parser: argparse.ArgumentParser) -> None:
    _scoring_arguments(parser)
    parser.add_argument(
        "--data", required=True, metavar="FILE",
        help="JSON lines of multiple-choice items: ctx/context/prompt/question, endings/choices, label/answer "
        "(HellaSwag's files as they are)",
    )  # fmt: skip
    parser.add_argument(
        "--separator", default=" ", help="text between the context and each choice (default: one space)"
    )
    parser.add_argument("--limit", type=int, default=0, help="score only the first N items (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="choices per forward pass (default 16)")
    parser.add_argument("--details", metavar="FILE", help="write each item's scores and picks to FILE as JSON lines")


@evaluate("choice", "accuracy of a language model on multiple-choice items (HellaSwag-style), by likelihood",
          _choice_arguments)  # fmt: skip
def run_eval_choice(args: argparse.Namespace) -> int:
    import json

    from gptlab.checkpoint import atomic_write_text
    from gptlab.evaluate import score_choices_run

    if args.batch_size < 1:
        raise GptlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit < 0:
        raise GptlabError(f"--limit must be 0 (all) or positive, got {args.limit}")
    with progress_bar("scoring", "choice") as progress:
        score = score_choices_run(
            args.run_path, args.data, args.separator, args.limit, args.batch_size, args.device, args.dtype, progress
        )
    if args.details:
        atomic_write_text(args.details, "".join(json.dumps(record) + "\n" for record in score.details()))
    if args.json:
        print(json.dumps(score.as_dict()))
        return 0
    result = score.as_dict()
    print(f"{args.data} ({score.items:,} items, {score.extra['choices']:,} choices, {score.seconds:.1f} s)")
    print(" | ".join(f"{rule.replace('_', ' ')} {result[rule]:.4f} ± {result[rule + '_stderr']:.4f}"
                     for rule in score.RULES))  # fmt: skip
    if args.details:
        print(f"each item's scores: {args.details}")
    return 0


# ---------------------------------------------------------------- gptlab serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_OR_CHECKPOINT", help="a run directory or a checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--name", help="model name clients ask for (default: the run directory's name)")
    parser.add_argument(
        "--max-tokens-limit", type=int, default=4096, metavar="N",
        help="the most tokens a request may ask for (default 4096; requests are served one at a time)",
    )  # fmt: skip
    _generation_arguments(parser)


@command("serve", "serve a run over an OpenAI-compatible HTTP API (completions and chat, streaming)",
         _serve_arguments)  # fmt: skip
def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gptlab.generate import load_generator
    from gptlab.serve import create_app, listening_socket

    defaults = _generation_config(args)
    if args.max_tokens_limit < 1 or defaults.max_new_tokens > args.max_tokens_limit:
        raise GptlabError(
            f"--max-tokens-limit must be at least 1 and at least --max-new-tokens ({defaults.max_new_tokens}), "
            f"got {args.max_tokens_limit}"
        )
    # Bound here, before the model loads, so a bad port or one in use is a one-line error at once.
    with listening_socket(args.host, args.port) as sock:
        run = load_generator(args.run_dir, args.device, args.dtype)
        name = args.name or run.run_dir.resolve().name
        port = sock.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address goes in brackets in a URL
        print(f"serving {run.run_dir} as {name!r} on http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
        app = create_app(run, name, defaults, args.max_tokens_limit)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    return 0


# ---------------------------------------------------------------- gptlab finetune classify


def _finetune_classify_arguments(parser: argparse.ArgumentParser) -> None:
    training_arguments(
        parser,
        "classify",
        [*FINETUNE_MODEL_OPTIONS, "classify", "train", "lora"],
        "train low-rank adapters and the head (--classify.trainable lora)",
    )


@finetune("classify", "turn a trained model (--init-from RUN) into a text classifier: labels with probabilities",
          _finetune_classify_arguments)  # fmt: skip
def run_finetune_classify(args: argparse.Namespace) -> int:
    from gptlab.classify import finetune_classify, format_report

    result = training_run(args, finetune_classify, "classify")
    print(
        f"\ndone: {result.train.step} steps, {result.trainable_parameters:,} parameters trained, "
        f"{result.train.elapsed:.0f} s of training"
    )
    print(format_report(result.validation, "validation split"))
    print(format_report(result.test, "test split"))
    print(f"run directory: {result.run_dir}")
    for name, path in result.files.items():
        print(f"{name + ':':<14} {path}")
    print(f'classify with: gptlab classify {result.run_dir} "some text"')
    return 0


# ---------------------------------------------------------------- gptlab classify


def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a classifier run, or any language model run with --few-shot")
    parser.add_argument("texts", metavar="TEXT", nargs="*", help="texts to classify (none: report on the test split)")
    parser.add_argument("--file", help="texts to classify: a .tsv/.csv/.jsonl table (labels give metrics) or a .txt")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--few-shot", type=int, metavar="K", help="prompt a language model with K labelled examples")
    parser.add_argument("--labels", help="label names for --few-shot, comma-separated (e.g. ham,spam)")
    parser.add_argument("--split-from", metavar="RUN", help="--few-shot on the data and split of this classifier run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of few-shot examples (default 0)")
    parser.add_argument(
        "--checkpoint", choices=["latest", "best"], default="latest", help="which checkpoint of RUN (default latest)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    add_config_arguments(parser, ["classify"], run_fields=False)


def _classification_data_config(args: argparse.Namespace, base: dict):
    """The ClassifyConfig of the labelled data: `base` (a run's classify section), then --config and options."""
    from gptlab.config import ClassifyConfig, config_from_dict

    values, _ = collect_config(args, {"classify": dict(base)})
    section = values.get("classify") or {}
    if args.labels:
        section["labels"] = [label.strip() for label in args.labels.split(",") if label.strip()]
    return config_from_dict(ClassifyConfig, section, where="classify.")


def _print_predictions(records: list[dict]) -> None:
    for record in records:
        text = " ".join(record["text"].split())
        text = text[:100] + ("..." if len(text) > 100 else "")
        print(f"{record['label']}\t{record['probabilities'][record['label']]:.4f}\t{text}")


def _classifier_results(run, data_config, texts: list[str], args: argparse.Namespace, device):
    """(predictions, None) of a finetuned classifier for `texts`; without texts (None, its test split report)."""
    from gptlab import classify

    if texts:
        return classify.classify_texts(run, texts, args.batch_size, device), None
    return None, classify.evaluate_run(run, args.batch_size, device)


def _few_shot_results(run, data_config, texts: list[str], args: argparse.Namespace, device):
    """(predictions, None) of prompting with K training examples; without texts (None, the test split report)."""
    from gptlab import classify

    data = classify.prepare_classification_data(data_config)
    examples = classify.few_shot_examples(data.splits["train"], data.labels, args.few_shot, args.seed)
    if texts:
        predictions = classify.few_shot_classify(run.model, run.tokenizer, examples, texts, data.labels,
                                                 args.batch_size, device)  # fmt: skip
        return predictions, None
    return None, classify.few_shot_evaluate(run.model, run.tokenizer, data, examples, args.batch_size, device)


@command("classify", "label texts with a finetuned classifier, or by few-shot prompting a language model",
         _classify_arguments)  # fmt: skip
def run_classify(args: argparse.Namespace) -> int:
    import json

    from gptlab import classify
    from gptlab.checkpoint import read_run_config
    from gptlab.train import resolve_device

    if args.batch_size < 1:
        raise GptlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.few_shot is None and (args.labels or args.split_from):
        raise GptlabError("--labels and --split-from go with --few-shot K")
    if args.few_shot is not None and args.few_shot < 0:
        raise GptlabError(f"--few-shot must be 0 (zero-shot) or more examples, got {args.few_shot}")
    if args.file and args.texts:
        raise GptlabError("give texts as arguments or with --file, not both")
    device = resolve_device(args.device)
    if args.few_shot is None:
        run = classify.load_classifier(args.run_dir, device, args.checkpoint)
        data_config = _classification_data_config(args, run.config["classify"])
    else:
        run = classify.load_language_model(args.run_dir, device, args.checkpoint)
        base = read_run_config(args.split_from).get("classify") or {} if args.split_from else {}
        data_config = _classification_data_config(args, base)
        if not data_config.labels:
            raise GptlabError("--few-shot needs the label names to score: --labels A,B (e.g. ham,spam)")
    table = None
    if args.file:
        table = classify.read_texts(args.file, data_config.text_column, data_config.label_column, data_config.columns)
    texts = table.texts if table else list(args.texts)
    results = _classifier_results if args.few_shot is None else _few_shot_results
    predictions, report = results(run, data_config, texts, args, device)
    if table is not None:
        report = classify.score_predictions(predictions, table.labels, data_config.labels, table.source)

    if args.json:
        result = {"run": str(run.run_dir), "predictions": predictions, "metrics": report} if texts else report
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    if texts:
        _print_predictions(predictions)
    if report is not None:
        title = "texts with labels" if texts else "test split"
        print(
            classify.format_report(report, title + ("" if args.few_shot is None else f", {args.few_shot}-shot prompt"))
        )
    return 0
