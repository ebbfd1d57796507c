"""The learning numbers and the ablation tables (paper Tables 3 and 4) on synthetic data, into RESULTS.md.

    python -m benchmarks.ablation [--root runs/ablation] [--train-clips 600] [--val-clips 200] [--stage1-epochs 25]
        [--stage2-epochs 60] [--seeds 3] [--out benchmarks/RESULTS.md] [--collect]

Two data sets of `emi synth` clips are prepared with emi.demo's Pipeline (synth -> shards -> Stage I with tiny
encoders -> features; each step kept and skipped when done): a clean one and one whose audio is replaced by loud
noise on half of the clips. Then one command trains every variant over the seeds and writes the results table:

    emi sweep --config configs/sweeps/ablation.yaml --local

(with overrides where --root, --stage2-epochs or --seeds differ from what the sweep file says),

then the section "## Learning and ablation" of RESULTS.md is written from the sweep's table (results.csv,
cells.csv, ensemble.json), with the audio's fusion weight on clean and corrupted clips read from the checkpoints
(`emi.serve.robustness.modality_weights`); the rest of RESULTS.md is kept. About 1.5 hours on 2 cores (the two data sets
about 12 minutes each, then 42 Stage II cells, two at a time); a re-run continues where it stopped, and --collect
trains nothing: the section from the finished sweep.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import cpu_model, table
from benchmarks.results import RESULTS, write_section
from emi.config import read_config_file
from emi.demo import Pipeline
from emi.serve.robustness import mean_weight, modality_weights
from emi.synth import read_corruption

REPO = Path(__file__).resolve().parents[1]
SWEEP = "configs/sweeps/ablation.yaml"  # relative to the checkout, where the sweep runs
DEFAULT_ROOT = REPO / "runs/ablation"  # where the sweep file expects the data sets, and puts the sweep
SECTION = "Learning and ablation"
STAGE1, STAGE1_EPOCHS = ("optim.lr=2e-3",), 25
STAGE2_EPOCHS = read_config_file(REPO / SWEEP)["overrides"]["train.epochs"]  # the learning tests train as long
DATA_SETS = {"clean": {}, "audio-noise": {"corrupt_modality": "audio", "corrupt_frac": 0.5}}

# label -> the sweep's variant (configs/sweeps/ablation.yaml)
MODULES = {
    "baseline (no TFE, concatenation)": "modules-baseline",
    "+TFE": "modules-tfe",
    "+QAM": "modules-qam",
    "+TFE +QAM (full model)": "full",
}
MODALITIES = {
    "V": "modalities-v",
    "V+T": "modalities-vt",
    "A": "modalities-a",
    "V+A": "modalities-va",
    "A+T": "modalities-at",
    "V+A+T": "full",
}
FUSIONS = {
    "qam": "audio-noise-qam",
    "mean": "audio-noise-mean",
    "concat": "audio-noise-concat",
    "xattn": "audio-noise-xattn",
    "late": "audio-noise-late",
}


def prepare(
    root: Path, train_clips: int, val_clips: int, stage1_epochs: int, build: bool = True
) -> dict[str, Pipeline]:
    """The data sets' pipelines; each one's data built first where `build` (steps done before are skipped)."""
    pipelines = {}
    for name, corruption in DATA_SETS.items():
        pipeline = pipelines[name] = Pipeline(root / name, train_clips, val_clips, **corruption)
        if build:
            pipeline.prepare_data()
            pipeline.extract_features(pipeline.train_stage1("stage1", stage1_epochs, *STAGE1))
    return pipelines


def sweep_minutes(sweep: Path) -> float:
    """Minutes from the first cell's start to the last cell's last logged step, from the cells' TensorBoard event
    files (named by their creation time, last written at the run's end)."""
    events = list(sweep.glob("cells/*/*/tb/**/events.out.tfevents.*"))
    start = min(float(path.name.split(".")[3]) for path in events)
    return (max(path.stat().st_mtime for path in events) - start) / 60


def sweep_command(
    root: Path, pipelines: dict[str, Pipeline], stage2_epochs: int | None, seeds: int | None
) -> list[str]:
    """`emi sweep` of configs/sweeps/ablation.yaml, with overrides only where these options differ from the file
    (the data under another root, other epochs or seeds)."""
    overrides = []
    if root != DEFAULT_ROOT:
        overrides += [f"output_dir={root}"] + [
            f"data.{name}.{split}={pipeline.features(split)}"
            for name, pipeline in pipelines.items()
            for split in ("train", "val")
        ]
    if stage2_epochs is not None:
        overrides += [f"overrides.train.epochs={stage2_epochs}", f"overrides.optim.restart_epochs={stage2_epochs}"]
    if seeds is not None:
        overrides.append(f"repeat.run.seed=[{','.join(map(str, range(seeds)))}]")
    return [sys.executable, "-m", "emi.cli", "sweep", "--config", SWEEP, "--local", *overrides]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as file:
        return list(csv.DictReader(file))


def shown(row: dict[str, str], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{float(mean):.4f}" + (f" ± {float(std):.4f}" if std else "")


def section(
    root: Path, pipelines: dict[str, Pipeline], args: argparse.Namespace, command: list[str], seconds: float | None
) -> str:
    """The RESULTS.md section from the finished sweep; `seconds`: this command's time (None with --collect)."""
    sweep = root / "sweep"
    variants = {row["variant"]: row for row in read_csv(sweep / "results.csv")}
    cells = read_csv(sweep / "cells.csv")
    epochs = yaml.safe_load((sweep / "sweep.yaml").read_text())["overrides"]["train.epochs"]
    seeds = len({cell["run.seed"] for cell in cells})
    full = variants["full"]
    emotions = [
        name.removeprefix("pearson/").removesuffix("_mean")
        for name in full
        if name.startswith("pearson/") and name.endswith("_mean")
    ]
    noisy = pipelines["audio-noise"]
    corrupted = read_corruption(noisy.root / "data/synth/val/corruption.csv")
    rows_fusion = []
    for fusion, variant in FUSIONS.items():
        row = variants[variant]
        trust = "-"
        if fusion != "concat":  # concatenation has no per-modality weights
            pairs = []
            for cell in (c for c in cells if c["variant"] == variant and c["status"] == "finished"):
                weights = modality_weights(REPO / cell["run_dir"] / "best", str(noisy.features("val")))
                pairs.append([mean_weight(weights, keys, "audio") for keys in corrupted])
            trust = " / ".join(f"{sum(p[i] for p in pairs) / len(pairs):.3f}" for i in (0, 1)) if pairs else "-"
        rows_fusion.append(
            [fusion, shown(row, "mean_pearson")]
            + [shown(row, f"mean_pearson_without_{m}") for m in ("vision", "audio", "text")]
            + [trust]
        )
    ensemble = json.loads((sweep / "ensemble.json").read_text())
    best = max((c for c in cells if c["status"] == "finished"), key=lambda c: float(c["mean_pearson"]))
    return "\n\n".join(
        [
            f"Measured {datetime.date.today()} on {cpu_model()}, with `python -m benchmarks.ablation`"
            + (f" in {seconds / 60:.0f} min" if seconds is not None else ", this section written by its `--collect`")
            + f" ({args.train_clips} train / {args.val_clips} val `emi synth` clips, shards at "
            f"64 px; Stage I: tiny encoders, {args.stage1_epochs} epochs, lr 2e-3, 2 processes, ZeRO-2). Stage II: one "
            f"`emi sweep` of {len(cells)} cells, configs/stage2/tiny.yaml for {epochs} epochs at batch 32, one process "
            f"per cell and two cells at a time ({sweep_minutes(sweep):.0f} min from the first cell's start to the last "
            f"cell's end), every variant over {seeds} Stage II seeds on the same features:",
            f"`{' '.join(['emi', *(shown_path(part) for part in command[3:])])}`",
            "Each number is the best epoch's val mean Pearson (the checkpoint Stage II exports), mean ± sample std "
            "over "
            f"the seeds; the sweep's own table is {shown_path(str(sweep / 'results.md'))}.",
            "Full model, clean data, per emotion:",
            table(
                ["emotion", "val Pearson"],
                [[name, shown(full, f"pearson/{name}")] for name in emotions] + [["mean", shown(full, "mean_pearson")]],
            ),
            "Modules (paper Table 3), clean data:",
            table(
                ["Stage II", "val mean Pearson"],
                [[label, shown(variants[v], "mean_pearson")] for label, v in MODULES.items()],
            ),
            "Modalities (paper Table 4), full model, clean data:",
            table(
                ["modalities", "val mean Pearson"],
                [[label, shown(variants[v], "mean_pearson")] for label, v in MODALITIES.items()],
            ),
            "Fusion when half of the clips have their audio replaced by loud noise (`--corrupt-modality audio "
            "--corrupt-frac 0.5`): val mean Pearson, the same with one modality removed at evaluation time, and the "
            "audio's mean fusion weight on the clean / the corrupted val clips "
            "(`emi.serve.robustness.modality_weights`, "
            "averaged over the seeds):",
            table(
                [
                    "fusion",
                    "val mean Pearson",
                    "without vision",
                    "without audio",
                    "without text",
                    "audio weight clean / corrupted",
                ],
                rows_fusion,
            ),
            f"Best cell: {best['cell']} ({float(best['mean_pearson']):.4f}). Top-{len(ensemble['members'])} ensemble "
            f"(the mean prediction of {', '.join(ensemble['members'])} on its val set): "
            + (
                f"{ensemble['report']['mean_pearson']:.4f}."
                if "report" in ensemble
                else f"not computed ({ensemble['error']})."
            ),
            reading(variants, cells),
        ]
    )


def shown_path(text: str) -> str:
    """A path below the checkout relative to it (RESULTS.md names no folder outside the repository)."""
    path = Path(text)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else text


def reading(variants: dict[str, dict[str, str]], cells: list[dict[str, str]]) -> str:
    """What the tables say, computed from them (so it stays true when the numbers move)."""
    score = {(c["variant"], c["run.seed"]): float(c["mean_pearson"]) for c in cells if c["status"] == "finished"}
    seeds = sorted({seed for _, seed in score}, key=int)

    def gains(fusion: str, baseline: str) -> str:
        """`fusion` minus `baseline` on the noisy-audio clips, seed by seed."""
        a, b = FUSIONS[fusion], FUSIONS[baseline]
        return ", ".join(f"{score[(a, s)] - score[(b, s)]:+.3f}" for s in seeds if (a, s) in score and (b, s) in score)

    full, no_tfe = (float(variants[v]["mean_pearson_mean"]) for v in ("full", "modules-qam"))
    lines = [
        f"Reading: on the noisy-audio clips, per Stage II seed, quality-aware fusion minus plain averaging: "
        f"{gains('qam', 'mean')}; quality-aware fusion minus concatenation: {gains('qam', 'concat')}; late "
        f"fusion minus concatenation: {gains('late', 'concat')}."
    ]
    if full < no_tfe:
        lines.append(
            f"On these synthetic clips the temporal blocks (TFE) do not help the quality-aware model "
            f"({full:.4f} with, {no_tfe:.4f} without, mean over seeds), unlike the paper's Table 3 on "
            "Hume-Vidmimic2."
        )
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help="work folder of the data sets and the "
        "sweep (default: runs/ablation in the checkout, which configs/sweeps/ablation.yaml names)",
    )
    parser.add_argument("--train-clips", type=int, default=600)
    parser.add_argument("--val-clips", type=int, default=200)
    parser.add_argument("--stage1-epochs", type=int, default=STAGE1_EPOCHS)
    parser.add_argument("--stage2-epochs", type=int, default=None, help=f"default: the sweep file's ({STAGE2_EPOCHS})")
    parser.add_argument(
        "--seeds", type=int, default=None, help="Stage II seeds per variant (default: the sweep file's)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the RESULTS.md to write the section into")
    parser.add_argument(
        "--collect", action="store_true", help="build and train nothing: the section from the finished sweep"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    started = time.perf_counter()
    pipelines = prepare(root, args.train_clips, args.val_clips, args.stage1_epochs, build=not args.collect)
    command = sweep_command(root, pipelines, args.stage2_epochs, args.seeds)
    if not args.collect:
        print(f"\n== Stage II: every variant of {SWEEP}\n$ {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)  # exit 3 (a cell did not finish) stops here: run it again
    text = section(root, pipelines, args, command, None if args.collect else time.perf_counter() - started)
    write_section(SECTION, text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
