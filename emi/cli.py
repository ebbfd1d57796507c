"""The `emi` command line: parse, call one library function, map errors to exit codes (emi.errors lists them)."""

from __future__ import annotations

import argparse
import json
import sys

from emi import __version__
from emi.arguments import HelpFormatter, parse_run_args
from emi.config import (
    CONFIG_KINDS,
    CONFIG_SCHEMAS,
    SHIPPED_CONFIGS,
    config_kind,
    config_to_dict,
    load_config,
    resolve_config_path,
    shipped_config_names,
)
from emi.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, StoppedError, UsageError
from emi.models.options import check_model_options
from emi.shards.arguments import add_build_arguments
from emi.storage import StorageUnavailable


def _shards_build(args: argparse.Namespace) -> int:
    from emi.shards.build import build_shards

    summary = build_shards(
        videos=args.videos,
        labels=args.labels,
        out=args.out,
        split=args.split,
        fps=args.fps,
        sample_rate=args.sample_rate,
        frame_size=args.frame_size,
        shard_size=args.shard_size,
        workers=args.workers,
        asr=args.asr,
        transcripts=args.transcripts,
        face_crop=args.face_crop,
        num_tasks=args.num_tasks,
        task_index=args.task_index,
    )
    print(summary.describe())
    return EXIT_OK if summary.num_failed == 0 else EXIT_PARTIAL


def _shards_merge(args: argparse.Namespace) -> int:
    from emi.shards.merge import merge_shards

    summary = merge_shards(args.out)
    print(summary.describe())
    return EXIT_OK if summary.merged and summary.num_failed == 0 else EXIT_PARTIAL


def _shards_stats(args: argparse.Namespace) -> int:
    from emi.shards.stats import shard_stats

    print(json.dumps(shard_stats(args.dir), indent=2))
    return EXIT_OK


def _synth(args: argparse.Namespace) -> int:
    from emi.synth import parse_size, synthesize

    summary = synthesize(
        out=args.out,
        clips=args.clips,
        seed=args.seed,
        corrupt_modality=args.corrupt_modality,
        corrupt_frac=args.corrupt_frac,
        workers=args.workers,
        prefix=args.prefix,
        size=parse_size(args.size),
        labels=args.labels,
    )
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _features_extract(args: argparse.Namespace) -> int:
    from emi.serve.features import extract_features

    print(
        json.dumps(
            extract_features(
                encoders=args.encoders,
                shards=args.shards,
                out=args.out,
                batch_size=args.batch_size,
                num_workers=args.workers,
                manifest=args.manifest,
            ),
            indent=2,
        )
    )
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from emi.devices import process_state
    from emi.serve.evaluate import evaluate

    report = evaluate(
        checkpoint=args.checkpoint,
        shards=args.shards,
        out=args.out,
        batch_size=args.batch_size,
        tb=args.tb,
        workers=args.workers,
        manifest=args.manifest,
        drop=args.drop,
        corrupt=args.corrupt,
    )
    if process_state().is_main_process:  # on several ranks every rank has the report; one prints it
        print(json.dumps(report, indent=2))
    return EXIT_OK if report["num_skipped"] == 0 else EXIT_PARTIAL  # a score over some of the clips only


def _predict(args: argparse.Namespace) -> int:
    from emi.serve.predict import predict, predict_to_csv, video_files

    if args.out is None:
        if not args.files or args.shards or args.videos:
            raise UsageError(
                "without --out, name the video files to predict (JSON on stdout); --shards and "
                "--videos write a CSV: give --out"
            )
        results = predict(checkpoint=args.checkpoint, videos=args.files, asr=args.asr, batch_size=args.batch_size)
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return EXIT_OK if all("error" not in result for result in results) else EXIT_PARTIAL
    if sum(map(bool, (args.files, args.shards, args.videos))) != 1:
        raise UsageError("give one of --shards URL, --videos DIR or video files")
    videos, refused = video_files(args.videos) if args.videos else (args.files or None, [])
    summary = predict_to_csv(
        checkpoint=args.checkpoint,
        out=args.out,
        shards=args.shards,
        videos=videos,
        manifest=args.manifest,
        asr=args.asr,
        batch_size=args.batch_size,
        workers=args.workers,
        refused=refused,
    )
    if summary.main_process:  # on several ranks every rank has the summary; one prints it
        print(summary.describe())
    return EXIT_OK if not summary.failures else EXIT_PARTIAL


def _sweep(args: argparse.Namespace) -> int:
    from emi.sweep.run import run_sweep

    return run_sweep(args.config, args.overrides, local=args.local, collect_only=args.collect)


def _ensemble(args: argparse.Namespace) -> int:
    from emi.serve.ensemble import write_ensemble

    print(write_ensemble(args.out, args.checkpoint))
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from importlib import import_module

    parse_run_args(args.stage_args, prog=f"emi train {args.stage}")  # --help and bad options: before the imports
    return import_module(f"emi.stages.{args.stage}").main(args.stage_args)


def _config_list(args: argparse.Namespace) -> int:
    print(f"shipped configs (in {SHIPPED_CONFIGS}); give one by name: --config stage1/tiny.yaml")
    for name in shipped_config_names():
        print(f"  {name}")
    return EXIT_OK


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    path = resolve_config_path(args.name)
    kind = args.kind or config_kind(path)
    if kind == "sweep":
        from emi.sweep.plan import load_sweep

        config = load_sweep(path, args.overrides).config
    else:
        config = load_config(CONFIG_SCHEMAS[kind], path, args.overrides)
        check_model_options(config)
    print(f"# {kind} config {path}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return EXIT_OK


def _commands(parent: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    return parent.add_subparsers(dest=dest, required=True, metavar="COMMAND")


def _command(commands: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=kwargs.pop("description", help), formatter_class=HelpFormatter, **kwargs
    )


def _add_shards(commands: argparse._SubParsersAction) -> None:
    shards = _commands(_command(commands, "shards", "build and inspect WebDataset shards"), "shards_command")
    build = _command(shards, "build", "pack video clips and a labels CSV into WebDataset tar shards")
    add_build_arguments(build)
    build.set_defaults(func=_shards_build)

    merge = _command(
        shards,
        "merge",
        "merge the partial manifests of a job-array build into manifest.json",
        description="Merge the partial manifests of a job-array build into manifest.json; exit 3 "
        "naming the tasks to run again when some are missing or incomplete.",
    )
    merge.add_argument("out", help="the --out of the array's tasks")
    merge.set_defaults(func=_shards_merge)

    stats = _command(shards, "stats", "print a JSON summary of a shard folder")
    stats.add_argument("dir", help="a shard folder with its manifest.json")
    stats.set_defaults(func=_shards_stats)


def _add_features(commands: argparse._SubParsersAction) -> None:
    features = _commands(
        _command(commands, "features", "Stage II features from the frozen Stage I encoders"), "features_command"
    )
    extract = _command(
        features,
        "extract",
        "run the exported encoders over clip shards",
        description="Run the exported Stage I encoders over clip shards into feature shards; "
        "`accelerate launch -m emi.cli features extract ...` splits the shards over the ranks.",
    )
    extract.add_argument("--encoders", required=True, help="Stage I export folder (runs/<name>/export)")
    extract.add_argument("--shards", required=True, help="clip shards: a folder with manifest.json, a pattern, ...")
    extract.add_argument(
        "--out", required=True, help="output folder (or URL prefix) for the feature shards and manifest.json"
    )
    extract.add_argument(
        "--manifest",
        default=None,
        help="the shards' manifest.json, where it is not beside them (pipe: and remote URLs)",
    )
    extract.add_argument("--batch-size", type=int, default=8, help="clips per encoder batch")
    extract.add_argument("--workers", type=int, default=1, help="decoding workers")
    extract.set_defaults(func=_features_extract)


CHECKPOINT_HELP = (
    "fusion checkpoint folder (runs/<name>/best) or ensemble folder (emi ensemble); given several "
    "times, an ensemble: the members' predictions are averaged"
)


def _add_evaluate_and_predict(commands: argparse._SubParsersAction) -> None:
    _add_evaluate(commands)
    _add_predict(commands)
    ensemble = _command(
        commands,
        "ensemble",
        "write an ensemble folder listing Stage II checkpoints",
        description="Write an ensemble folder listing Stage II checkpoints, for evaluate and predict.",
    )
    ensemble.add_argument(
        "--out", required=True, help="the ensemble folder (new): ensemble.json lists the members relative to it"
    )
    ensemble.add_argument("--checkpoint", required=True, action="append", help="a member checkpoint (repeat)")
    ensemble.set_defaults(func=_ensemble)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = _command(
        commands,
        "evaluate",
        "score a Stage II checkpoint or ensemble on labelled shards",
        description="Score a Stage II checkpoint or ensemble on labelled feature or clip shards; "
        "writes a JSON report, a figure beside it and TensorBoard scalars. `accelerate launch -m "
        "emi.cli evaluate ...` splits the clips over the ranks.",
    )
    evaluate.add_argument("--checkpoint", required=True, action="append", help=CHECKPOINT_HELP)
    evaluate.add_argument(
        "--shards",
        required=True,
        help="feature shards (emi features extract) or clip shards "
        "(emi shards build): a folder with manifest.json, a pattern, ...",
    )
    evaluate.add_argument(
        "--out",
        default=None,
        help="report JSON, a path or a URL (default: <checkpoint>/eval/"
        "<shard folder>.json; the figure goes beside it as .png; needed for several --checkpoint)",
    )
    evaluate.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="vision|audio|text",
        help="robustness: score with this modality removed from every clip (repeatable)",
    )
    evaluate.add_argument(
        "--corrupt",
        action="append",
        default=[],
        metavar="vision|audio|text",
        help="robustness: score with this modality's features replaced by noise of the same mean "
        "and spread, clip by clip (repeatable)",
    )
    evaluate.add_argument("--manifest", default=None, help="the shards' manifest.json, where it is not beside them")
    evaluate.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    evaluate.add_argument("--tb", default=None, help="TensorBoard folder (default: <checkpoint>/eval/tb)")
    evaluate.add_argument("--workers", type=int, default=1, help="decoding workers")
    evaluate.set_defaults(func=_evaluate)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = _command(
        commands,
        "predict",
        "EMI intensities of videos: JSON on stdout, or the challenge's CSV",
        description="EMI intensities of video files (JSON on stdout), or of shards or a videos folder "
        "into the challenge's CSV (--out); `accelerate launch -m emi.cli predict ...` splits the "
        "clips over the ranks.",
    )
    predict.add_argument("--checkpoint", required=True, action="append", help=CHECKPOINT_HELP)
    predict.add_argument("files", nargs="*", metavar="VIDEO", help="video files")
    predict.add_argument(
        "--shards",
        default=None,
        help="clip or feature shards: a folder or URL prefix with manifest.json, a pattern, ...",
    )
    predict.add_argument("--videos", default=None, help="a folder of videos: every clip in it")
    predict.add_argument(
        "--out",
        default=None,
        help="predictions CSV (Filename, then the six intensities), a path "
        "or a URL; failures go to <out without .csv>.failures.json",
    )
    predict.add_argument("--manifest", default=None, help="the shards' manifest.json, where it is not beside them")
    predict.add_argument(
        "--asr",
        default=None,
        help="none | whisper:NAME_OR_PATH (default: as the checkpoint's training clips were prepared)",
    )
    predict.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    predict.add_argument("--workers", type=int, default=1, help="decoding workers (--shards)")
    predict.set_defaults(func=_predict)


def _add_train_and_sweep(commands: argparse._SubParsersAction) -> None:
    train = _command(
        commands,
        "train",
        "train a stage (one process; accelerate launch -m emi.cli train ... for several)",
        description="Run emi.stages.<stage>: the arguments after the stage are the stage's "
        "own; `emi train stage1 --help` lists them.",
    )
    train.add_argument("stage", choices=["stage1", "stage2"], help="which stage")
    train.add_argument(
        "stage_args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="--config FILE [--resume latest|PATH] [--trust-checkpoint] [key=value ...]",
    )
    train.set_defaults(func=_train)

    sweep = _command(
        commands,
        "sweep",
        "run a sweep file's Stage II cells and write its results table",
        description="Run the cells of a sweep file that are not finished (a Slurm job array, or "
        "--local), wait for them and write <sweep>/results.md and .csv (mean and std over the repeats, "
        "best cell, top-k ensemble), cells.csv and TensorBoard HParams. Exit code 0 when every cell "
        "finished, 3 when some did not.",
    )
    sweep.add_argument("--config", required=True, help="sweep file: a path or a shipped name (sweeps/ablation.yaml)")
    sweep.add_argument("--local", action="store_true", help="run the cells on this machine, not on Slurm")
    sweep.add_argument(
        "--collect", action="store_true", help="run nothing: write the results of the cells finished so far"
    )
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the sweep file: top_k=5, "
        "slurm.partition=gpu, data.clean.train=DIR, overrides.train.epochs=3, repeat.run.seed=[0,1]",
    )
    sweep.set_defaults(func=_sweep)


def _add_config(commands: argparse._SubParsersAction) -> None:
    config = _commands(_command(commands, "config", "list the shipped configs, show one resolved"), "config_command")
    listed = _command(config, "list", "the shipped configs, by the name --config takes")
    listed.set_defaults(func=_config_list)
    show = _command(config, "show", "print a config resolved: its overrides applied, every default filled in")
    show.add_argument("name", help="a config file, or a shipped config's name (stage1/tiny.yaml)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as the stage takes them")
    show.add_argument(
        "--kind",
        choices=sorted(CONFIG_KINDS),
        default=None,
        help="what the file configures (default: from its folder, stage1/, stage2/ or sweeps/, else from its keys)",
    )
    show.set_defaults(func=_config_show)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = _command(commands, "synth", "write a synthetic EMI dataset (mp4 clips, labels, transcripts)")
    synth.add_argument("--out", required=True, help="output folder: videos/, labels.csv, transcripts.csv")
    synth.add_argument("--clips", type=int, required=True, help="clips to write")
    synth.add_argument("--seed", type=int, default=0, help="seed of the clips' content and labels")
    synth.add_argument(
        "--corrupt-modality",
        choices=["video", "audio", "text"],
        default=None,
        help="replace this modality by noise on a share of the clips (corruption.csv says which)",
    )
    synth.add_argument("--corrupt-frac", type=float, default=0.0, help="the share of clips corrupted")
    synth.add_argument("--workers", type=int, default=1, help="clips encoded in parallel (processes)")
    synth.add_argument(
        "--prefix",
        default="",
        help="clip names start with it (default: none, 00001 ...); one per "
        "split (train-, val-) gives every clip its own key, as k-fold over train + val needs",
    )
    synth.add_argument("--size", default="128x128", help="the clips' width x height in pixels, e.g. 640x360")
    synth.add_argument(
        "--labels",
        choices=["emi", "expression-va"],
        default="emi",
        help="what labels.csv records: the six EMI intensities (default), or Expression, Valence and Arousal "
        "(a second, differently labelled data set to mix with the first)",
    )
    synth.set_defaults(func=_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"emi {__version__}")
    commands = _commands(parser, "command")
    _add_shards(commands)
    _add_features(commands)
    _add_evaluate_and_predict(commands)
    _add_train_and_sweep(commands)
    _add_config(commands)
    _add_synth(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"emi: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (StoppedError, StorageUnavailable) as err:
        print(f"emi: error: {err}", file=sys.stderr)
        return EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
