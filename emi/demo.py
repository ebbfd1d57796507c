"""`make demo`: the whole pipeline on the embedded synthetic data set, on this machine's CPUs.

    emi synth -> emi shards build -> Stage I (tiny encoders, 2 processes, ZeRO-2) -> emi features extract
    (2 processes) -> Stage II (2 processes, DDP) -> emi evaluate on the val set

Every step is the command a user would run; each is skipped or resumed when its output is already there, so a
second `make demo` is quick. Outputs: data/{synth,shards,features}/{train,val}, runs/stage1-tiny, runs/stage2-tiny.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from emi.inference import evaluate

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs/accelerate/cpu.yaml")]


def step(title: str, command: list[str]) -> None:
    print(f"\n== {title}\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-clips", type=int, default=240)
    parser.add_argument("--val-clips", type=int, default=80)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    emi = [sys.executable, "-m", "emi.cli"]
    started = time.perf_counter()

    for split, clips, seed in (("train", args.train_clips, 0), ("val", args.val_clips, 1)):
        synth = REPO / "data/synth" / split
        if not (synth / "labels.csv").is_file():
            step(f"synthesise {clips} {split} clips", [*emi, "synth", "--out", str(synth), "--clips", str(clips),
                                                      "--seed", str(seed), "--workers", "2"])
        step(f"pack the {split} clips into shards", [
            *emi, "shards", "build", "--videos", str(synth / "videos"), "--labels", str(synth / "labels.csv"),
            "--transcripts", str(synth / "transcripts.csv"), "--out", f"data/shards/{split}", "--split", split,
            "--frame-size", "64", "--shard-size", "64", "--workers", "2"])
    step("shard statistics", [*emi, "shards", "stats", "data/shards/train"])
    step("Stage I: contrastive pretraining (2 processes, DeepSpeed ZeRO-2)", [
        *ACCELERATE, "train/stage1.py", "--config", "configs/stage1/tiny.yaml", "--resume", "latest",
        "train.epochs=15", "train.log_every=20"])
    for split in ("train", "val"):
        step(f"features of the {split} clips from the frozen encoders (2 processes)", [
            *ACCELERATE, "-m", "emi.cli", "features", "extract", "--encoders", "runs/stage1-tiny/export",
            "--shards", f"data/shards/{split}", "--out", f"data/features/{split}"])
    step("Stage II: quality-aware fusion (2 processes, DDP)", [
        *ACCELERATE, "train/stage2.py", "--config", "configs/stage2/tiny.yaml", "--resume", "latest",
        "train.epochs=40", "optim.restart_epochs=40", "train.log_every=50"])

    report = evaluate(REPO / "runs/stage2-tiny/best", str(REPO / "data/features/val"))
    print("\n== val Pearson correlation of the best Stage II checkpoint")
    for key, value in report.items():
        if key.startswith("pearson/"):
            print(f"   {key.removeprefix('pearson/'):<14} {value:.3f}")
    print(f"   {'mean':<14} {report['mean_pearson']:.3f}   (MSE {report['mse']:.4f}, {report['num_samples']} clips)")
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Report and figure: runs/stage2-tiny/best/eval/")
    print("Training curves: tensorboard --logdir runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
