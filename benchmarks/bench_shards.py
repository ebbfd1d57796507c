"""Shard building: `emi shards build --workers 2` against the ffmpeg command line doing the same work.

Clips: synthetic clips (`emi synth`: H.264/AAC mp4, 128x128, 2-8 s) and the 8 GRID clips (MPEG-1 360x288, MP2
stereo 44.1 kHz, 3 s), in one folder with one labels CSV.
emi: the real command line, `python -m emi.cli shards build --workers 2`, into a new folder each round: Python
and worker start-up, probing, decoding, JPEG/WAV encoding, tar, manifest and sha256 all included.
Baseline: for each clip in turn, ONE ffmpeg process with two outputs (a single decode): frames at 5 fps scaled
to the builder's frame size (short side 256, long side even; the sizes are computed before timing, so the
baseline pays nothing for them) written as JPEGs with -q:v 2, and the audio as a 16 kHz mono wav, into a folder.
One process with two outputs is the stronger baseline: two processes per clip would decode twice.

    python -m benchmarks.bench_shards [--synthetic 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.timing import best_of_rounds, table, verdict
from emi import EMI_EMOTIONS
from emi.media import output_size, probe
from emi.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "tests" / "data" / "grid"  # the 8 real GRID clips (CC BY 4.0) the tests use too
FPS, SAMPLE_RATE, FRAME_SIZE = 5, 16000, 256
TARGET = 1.0  # emi clips/s over the ffmpeg command line's


def prepare_clips(root: Path, synthetic: int = 40, seed: int = 0, grid: Path = GRID) -> tuple[Path, Path]:
    """`synthetic` synthetic clips plus the GRID clips in root/videos, labels in root/labels.csv."""
    source = root / "synth"
    synthesize(source, clips=synthetic, seed=seed, workers=2)
    videos = root / "videos"
    shutil.copytree(source / "videos", videos)
    with open(source / "labels.csv", newline="") as file:
        rows = list(csv.reader(file))
    for clip in sorted(grid.glob("*.mpg")):
        shutil.copy(clip, videos / clip.name)
        rows.append([clip.name] + ["0.5"] * len(EMI_EMOTIONS))  # GRID has no emotion labels: any value will do
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return videos, labels


def emi_build(videos: Path, labels: Path, out: Path, workers: int) -> None:
    command = [sys.executable, "-m", "emi.cli", "shards", "build", "--videos", str(videos), "--labels", str(labels),
               "--out", str(out), "--workers", str(workers), "--fps", str(FPS), "--sample-rate", str(SAMPLE_RATE),
               "--frame-size", str(FRAME_SIZE)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"emi shards build failed ({result.returncode}): {result.stderr[-2000:]}")


def ffmpeg_commands(videos: Path, out: Path) -> list[list[str]]:
    """One command per clip: decode once, write 5 fps JPEGs at the builder's size and a 16 kHz mono wav."""
    commands = []
    for clip in sorted(videos.iterdir()):
        info = probe(clip)
        width, height = output_size(info.width, info.height, FRAME_SIZE)
        folder = out / clip.stem
        commands.append(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip),
                         "-map", "0:v:0", "-vf", f"fps={FPS},scale={width}:{height}", "-q:v", "2",
                         str(folder / "%04d.jpg"),
                         "-map", "0:a:0", "-ac", "1", "-ar", str(SAMPLE_RATE), str(folder / "audio.wav")])
    return commands


def ffmpeg_baseline(commands: list[list[str]], out: Path) -> None:
    for command in commands:
        Path(command[-1]).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(command, check=True)


def run(videos: Path, labels: Path, work: Path, repeats: int = 3, workers: int = 2) -> dict:
    """Best of `repeats` interleaved rounds of the emi build and the ffmpeg baseline over the same clips."""
    num_clips = sum(1 for _ in videos.iterdir())
    emi_out, baseline_out = work / "emi", work / "ffmpeg"
    commands = ffmpeg_commands(videos, baseline_out)

    def build() -> None:
        shutil.rmtree(emi_out, ignore_errors=True)
        emi_build(videos, labels, emi_out, workers)

    def baseline() -> None:
        shutil.rmtree(baseline_out, ignore_errors=True)
        ffmpeg_baseline(commands, baseline_out)

    best = best_of_rounds({"emi": build, "ffmpeg_cli": baseline}, repeats)
    manifest = json.loads((emi_out / "manifest.json").read_text())
    if manifest["num_samples"] != num_clips:
        raise RuntimeError(f"{emi_out}: built {manifest['num_samples']} of {num_clips} clips")
    frames = {"emi": manifest["num_frames"], "ffmpeg_cli": sum(1 for _ in baseline_out.glob("*/*.jpg"))}
    result = {"clips": num_clips, "workers": workers, "repeats": repeats, "frames": frames}
    for name, timing in best.items():
        result[name] = {"wall_s": round(timing["wall_s"], 3), "clips_per_s": round(num_clips / timing["wall_s"], 2),
                        "cpu_ms_per_clip": round(1000 * timing["cpu_s"] / num_clips, 1)}
    result["ratio"] = round(result["emi"]["clips_per_s"] / result["ffmpeg_cli"]["clips_per_s"], 3)
    result["cpu_ratio"] = round(result["ffmpeg_cli"]["cpu_ms_per_clip"] / result["emi"]["cpu_ms_per_clip"], 3)
    result["met"] = result["ratio"] >= TARGET
    return result


def section(result: dict) -> str:
    rows = [[name, result[name]["wall_s"], result[name]["clips_per_s"], result[name]["cpu_ms_per_clip"],
             result["frames"][name]] for name in ("emi", "ffmpeg_cli")]
    return "\n".join([
        "## 1. Shard building",
        "",
        f"What: clips/s of `emi shards build --workers {result['workers']}` (the real command line, start-up "
        f"included) against the ffmpeg command line doing the same decoding work, on the same {result['clips']} "
        "clips (synthetic H.264/AAC 128x128 mp4 and the 8 real GRID MPEG-1 clips) in the same run.",
        "",
        "How: the baseline runs, clip after clip, ONE ffmpeg process with two outputs (a single decode): "
        "`ffmpeg -i CLIP -map 0:v:0 -vf fps=5,scale=W:H -q:v 2 out/%04d.jpg -map 0:a:0 -ac 1 -ar 16000 "
        "out/audio.wav`, with W:H the builder's frame size (short side 256) computed before timing. "
        f"Best of {result['repeats']} interleaved rounds. CPU ms per clip counts every process (workers, ffmpeg, "
        "ffprobe); it shows the work done whatever else loads the machine.",
        "",
        table(["", "wall s", "clips/s", "CPU ms/clip", "frames"], rows),
        "",
        f"Ratio (emi clips/s / ffmpeg CLI clips/s): **{result['ratio']}**; target >= {TARGET}: "
        f"{verdict(result['met'])}. CPU per clip, ffmpeg CLI / emi: {result['cpu_ratio']}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=40, help="synthetic clips besides the 8 GRID clips")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emi-bench-shards-") as tmp:
        videos, labels = prepare_clips(Path(tmp), args.synthetic)
        print(json.dumps(run(videos, labels, Path(tmp), args.repeats), indent=2))


if __name__ == "__main__":
    main()
