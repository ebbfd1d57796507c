"""The command line of `emi shards build`, beside the builder: `emi` (emi.cli) and the job-array launcher
(emi.launch, which checks a build's arguments before it submits anything) parse it alike."""

from __future__ import annotations

import argparse

from emi.arguments import HelpFormatter


def add_build_arguments(build: argparse.ArgumentParser) -> None:
    build.add_argument("--videos", required=True, help="folder of clips (any container ffmpeg reads), or a URL prefix")
    build.add_argument("--labels", required=True, help="CSV with a Filename column and label columns")
    build.add_argument(
        "--out",
        required=True,
        help="output folder for <split>-NNNNNN.tar and manifest.json, or a "
        "URL prefix (s3://bucket/prefix, any fsspec URL)",
    )
    build.add_argument("--split", default="train", help="the split's name: it names the shard files")
    build.add_argument("--fps", type=float, default=5.0, help="frames kept per second of video")
    build.add_argument("--sample-rate", type=int, default=16000, help="audio sampling rate in Hz")
    build.add_argument("--frame-size", type=int, default=256, help="short side of the stored frames, in pixels")
    build.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    build.add_argument("--workers", type=int, default=1, help="clips decoded in parallel (processes)")
    build.add_argument(
        "--asr", default="none", help="speech recognition for the transcripts: none | whisper:NAME_OR_PATH"
    )
    build.add_argument("--transcripts", default=None, help="CSV with Filename and Text columns (instead of --asr)")
    build.add_argument("--face-crop", default="none", choices=["none", "opencv"], help="crop the frames to the face")
    build.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="build as one task of a job array of this many "
        "(in a Slurm array: SLURM_ARRAY_TASK_COUNT); then run `emi shards merge`",
    )
    build.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this task's index, 0 .. num-tasks - 1 (in a Slurm array: SLURM_ARRAY_TASK_ID)",
    )


def parse_build_arguments(argv: list[str]) -> argparse.Namespace:
    """A build's arguments (as `emi shards build` takes them); bad ones exit 2 with argparse's message."""
    parser = argparse.ArgumentParser(prog="emi shards build", formatter_class=HelpFormatter)
    add_build_arguments(parser)
    return parser.parse_args(argv)
