"""The `gptlab` command line: one subcommand per job. The only place that prints and exits.

Heavy imports (torch, numpy) happen inside the commands, so `gptlab --help` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gptlab.errors import GptlabError

# name -> (help, add_arguments, run); filled by the @command decorator below.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


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
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except GptlabError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- gptlab size


def resolve_model_config(name_or_path: str):
    """A GPTConfig from a preset name, a YAML model config, a run config or a run directory."""
    from pathlib import Path

    from gptlab.config import PRESETS, GPTConfig, config_from_dict, get_preset, load_config_file

    path = Path(name_or_path)
    if name_or_path in PRESETS or not path.exists():
        return get_preset(name_or_path)
    if path.is_dir():
        path = path / "config.yaml"
    values = load_config_file(path)
    if "model" in values and isinstance(values["model"], dict):
        values = values["model"]
    if "preset" in values:
        preset = values.pop("preset")
        return get_preset(preset, **values)
    return config_from_dict(GPTConfig, values, where="model.")


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

    from gptlab.sizing import format_size_report, size_report

    if not 0 < args.mfu <= 1:
        raise GptlabError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.flops <= 0 or args.tokens <= 0:
        raise GptlabError("--flops and --tokens must be positive")
    report = size_report(resolve_model_config(args.model), args.tokens, args.flops, args.mfu)
    if args.json:
        counts = report["parameters"]
        report["parameters"] = {
            **dataclasses.asdict(counts),
            "total": counts.total,
            "non_embedding": counts.non_embedding,
        }
        report["config"] = dataclasses.asdict(report["config"])
        print(json.dumps(report, indent=2))
    else:
        print(format_size_report(report))
    return 0
