"""Command-line pieces shared by `emi` (emi.cli) and the training entry points (emi.stages, through
emi.engine.main): the help layout, and the arguments of a training run. Light: `--help` answers before anything
heavy is imported."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to say (required, unset, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default == ""
            or default == []
            or default is argparse.SUPPRESS
            or "default" in (action.help or "")
        ):
            return action.help or ""
        return super()._get_help_string(action)


def parse_run_args(
    argv: list[str] | None, prog: str | None = None, description: str | None = None
) -> argparse.Namespace:
    """The command line every training entry point shares: `--config FILE [--resume latest|PATH]
    [--trust-checkpoint] [key=value ...]`; `run_overrides` turns it into config overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config",
        required=True,
        help="YAML run config: a path, or a shipped config's name (stage1/tiny.yaml; `emi config list`)",
    )
    parser.add_argument(
        "--resume",
        default=None,
        help="none | latest (the newest intact checkpoint, if any) | a "
        "checkpoint folder; sets train.resume (default: the config's, none)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume from a checkpoint another run wrote (train.trust_checkpoint=true); loading "
        "unpickles DeepSpeed's optimizer states, so only for checkpoints you trust like code",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. train.epochs=3 data.batch_size=8",
    )
    # intermixed: options may stand anywhere among the overrides (`a=1 --resume latest b=2`), as batch scripts
    # append `--resume latest` after whatever overrides the user gave
    return parser.parse_intermixed_args(argv)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of a `parse_run_args` command line, --resume and --trust-checkpoint included."""
    return [
        *args.overrides,
        *([f"train.resume={args.resume}"] if args.resume else []),
        *(["train.trust_checkpoint=true"] if args.trust_checkpoint else []),
    ]
