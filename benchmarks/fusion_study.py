"""Fusion under corrupted audio, and seed ensembles, on synthetic data: the section "## Fusion, robustness and
ensembles (N Stage II epochs)" of RESULTS.md.

    python -m benchmarks.fusion_study [--root DIR] [--train-clips 600] [--val-clips 200] [--stage2-epochs 60]
        [--collect] [--fusions concat,late]

The data set is `make ablation`'s second one (`emi synth --corrupt-modality audio --corrupt-frac 0.5`: half of the
train and of the val clips have their audio replaced by loud white noise), with the same Stage I and features, so a
`--root` shared with `python -m benchmarks.ablation --root` reuses them. Stage II is trained per fusion and seed (the
seed sets the initialisation, the shuffling and the dropout; the features stay the same), with configs/stage2/tiny.yaml
and the ablation's epochs (or --stage2-epochs), seed by seed; a re-run continues, and --collect trains nothing. Each
finished run's best checkpoint is scored on the val clips whose audio is clean and on those whose audio is noise, with
the audio missing (`emi evaluate --drop audio`) and with every clip's audio features replaced by noise (`--corrupt
audio`); for the fusions that weigh modalities, the audio's mean weight on clean and on corrupted val clips. Then
seed ensembles: each fusion's finished seeds (five for concat, three for the others) averaged (`emi evaluate
--checkpoint ...`), against the mean of their members. About two hours on 2 idle cores once the features exist
(17 Stage II runs of 60 epochs); --stage2-epochs 30 halves it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ablation import STAGE1, STAGE1_EPOCHS, STAGE2_EPOCHS
from benchmarks.harness import cpu_model, table
from benchmarks.results import write_section
from emi.demo import Pipeline
from emi.metrics import mean_pearson
from emi.serve.ensemble import load_ensemble
from emi.serve.evaluate import evaluate
from emi.serve.robustness import mean_weight, modality_weights
from emi.serve.scoring import shard_predictions
from emi.synth import read_corruption


def section_title(epochs: int) -> str:
    """One section per Stage II length: a 60-epoch study does not overwrite a 30-epoch one."""
    return f"Fusion, robustness and ensembles ({epochs} Stage II epochs)"


# label -> Stage II overrides
FUSIONS = {
    "concat": ("model.fusion=concat",),
    "mean": ("model.fusion=mean",),
    "qam": ("model.fusion=qam",),
    "xattn": ("model.fusion=xattn",),
    "late": ("model.fusion=late",),
}
SEEDS = (0, 1, 2)
ENSEMBLE_SEEDS = (0, 1, 2, 3, 4)
ENSEMBLED = ("concat",)  # the fusions whose five seeds are ensembled


def run_name(label: str, seed: int, epochs: int) -> str:
    return f"study-{label}-e{epochs}-seed{seed}"


def scores(pipeline: Pipeline, run: str, clean: set[str], noisy: set[str]) -> dict[str, float]:
    """The best checkpoint of one run, scored as the module docstring says (kept in reports/<run>/scores.json)."""
    report_folder = pipeline.root / "reports" / run
    cached = report_folder / "scores.json"
    if cached.exists():
        return json.loads(cached.read_text())
    best = pipeline.root / "runs" / run / "best"
    val = str(pipeline.features("val"))
    keys, preds, target, _ = shard_predictions(load_ensemble([best]), val, workers=0)
    rows = {key: index for index, key in enumerate(keys)}

    def subset(keys: set[str]) -> float:
        index = torch.tensor(sorted(rows[key] for key in keys))
        return mean_pearson(preds[0][index], target[index])

    result = {
        "all": mean_pearson(preds[0], target),
        "clean audio": subset(clean),
        "noise audio": subset(noisy),
        "audio missing": evaluate(best, val, out=report_folder / "drop-audio.json", workers=0, drop=["audio"])[
            "mean_pearson"
        ],
        "audio features noise": evaluate(
            best, val, out=report_folder / "corrupt-audio.json", workers=0, corrupt=["audio"]
        )["mean_pearson"],
    }
    if load_ensemble([best]).record.spec.options.fusion != "concat":  # concatenation weighs no modality
        weights = modality_weights(best, val)
        result["audio weight clean"], result["audio weight noise"] = (
            mean_weight(weights, clean, "audio"),
            mean_weight(weights, noisy, "audio"),
        )
    cached.write_text(json.dumps(result, indent=1) + "\n")
    return result


def finished(pipeline: Pipeline, run: str) -> bool:
    return (pipeline.root / "runs" / run / "export").is_dir()  # written when the last epoch ends


def mean_std(values: list[float], digits: int = 4, sign: str = "") -> str:
    shown = f"{statistics.mean(values):{sign}.{digits}f}"
    return shown + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def study(
    root: Path, train_clips: int, val_clips: int, epochs: int, collect_only: bool, fusions: list[str] | None = None
) -> str:
    """Train what is not trained yet (nothing with collect_only), then the section from the runs that finished;
    `fusions`: only these (default: all of FUSIONS)."""
    fusions = {label: FUSIONS[label] for label in fusions or FUSIONS}
    started = time.perf_counter()
    pipeline = Pipeline(root / "audio-noise", train_clips, val_clips, corrupt_modality="audio", corrupt_frac=0.5)
    if not collect_only:
        pipeline.prepare_data()
        pipeline.extract_features(pipeline.train_stage1("stage1", STAGE1_EPOCHS, *STAGE1))
        for seed in SEEDS:  # seed by seed: every fusion's first seed is in before any second one
            for label, overrides in fusions.items():
                pipeline.train_stage2(run_name(label, seed, epochs), epochs, *overrides, f"run.seed={seed}")
        for label in (label for label in ENSEMBLED if label in fusions):
            for seed in sorted(set(ENSEMBLE_SEEDS) - set(SEEDS)):
                pipeline.train_stage2(run_name(label, seed, epochs), epochs, *fusions[label], f"run.seed={seed}")
    minutes = (time.perf_counter() - started) / 60
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())  # 1, 5, 15 min: other jobs share the machine

    clean, noisy = read_corruption(pipeline.root / "data/synth/val/corruption.csv")
    seeds = {
        label: [seed for seed in ENSEMBLE_SEEDS if finished(pipeline, run_name(label, seed, epochs))]
        for label in fusions
    }
    results = {
        label: {
            seed: scores(pipeline, run_name(label, seed, epochs), clean, noisy)
            for seed in seeds[label]
            if seed in SEEDS
        }
        for label in fusions
    }
    columns = ["all", "clean audio", "noise audio", "audio missing", "audio features noise"]
    rows = []
    for label, runs in results.items():
        if not runs:
            continue
        cells = [mean_std([run[c] for run in runs.values()]) for c in columns]
        # seed by seed against concatenation: the same seed draws the same batches
        cells.append(
            "-"
            if label == "concat"
            else mean_std(
                [
                    run["all"] - results["concat"][seed]["all"]
                    for seed, run in runs.items()
                    if seed in results["concat"]
                ],
                sign="+",
            )
        )
        trust = "-"
        if "audio weight clean" in next(iter(runs.values())):
            trust = (
                f"{statistics.mean(run['audio weight clean'] for run in runs.values()):.3f} / "
                f"{statistics.mean(run['audio weight noise'] for run in runs.values()):.3f}"
            )
        rows.append([label, *cells, trust, ", ".join(f"{seed}: {run['all']:.4f}" for seed, run in runs.items())])

    ensemble_rows = []
    for label, members in seeds.items():
        if len(members) < 2:
            continue
        report = evaluate(
            [pipeline.root / "runs" / run_name(label, seed, epochs) / "best" for seed in members],
            str(pipeline.features("val")),
            out=pipeline.root / "reports" / f"ensemble-{label}.json",
            workers=0,
        )
        member_scores = [member["mean_pearson"] for member in report["members"]]
        ensemble_rows.append(
            [
                label,
                str(len(members)),
                ", ".join(f"{score:.4f}" for score in member_scores),
                f"{statistics.mean(member_scores):.4f}",
                f"{max(member_scores):.4f}",
                f"{report['mean_pearson']:.4f}",
                f"{report['mean_pearson'] - statistics.mean(member_scores):+.4f}",
            ]
        )

    timing = (
        f"{minutes:.0f} min of training, load average {load} at the end"
        if not collect_only
        else f"collected with --collect, load average {load}"
    )
    return "\n\n".join(
        [
            f"Measured {datetime.date.today()} on {cpu_model()}, with `python -m benchmarks.fusion_study "
            f"--stage2-epochs {epochs}` ({train_clips} train / {val_clips} val `emi synth` clips with the audio of "
            "half "
            f"of them replaced by loud noise; Stage I: tiny encoders, {STAGE1_EPOCHS} epochs; Stage II: "
            f"configs/stage2/tiny.yaml, {epochs} epochs, 2 processes, modality dropout 0.1, MSE (late: plus the MSE "
            f"of each modality's own prediction, loss.unimodal 1); each number is the val mean Pearson of a run's best "
            f"checkpoint; {timing}). Mean ± sample standard deviation over the Stage II "
            "seeds that finished (the last column: each seed's score).",
            "Fusion: all val clips; the val clips whose audio is clean; those whose audio is noise; all clips with the "
            "audio missing (`--drop audio`); all clips with the audio features replaced by noise of the same scale "
            "(`--corrupt audio`); the difference to concat seed by seed; the audio's mean fusion weight on clean / "
            "noise clips (qam, mean: the betas; xattn: the text query's attention on the real audio segments "
            "rather than the stand-in token; late: the weight of the audio's own prediction, mean over the emotions).",
            table(["fusion", *columns, "all - concat", "audio weight clean / noise", "per seed"], rows),
            "Seed ensembles: the best checkpoints of a fusion's finished seeds averaged (`emi evaluate --checkpoint "
            "... "
            "--checkpoint ...`), against their members:",
            table(
                ["fusion", "seeds", "members", "members' mean", "best member", "ensemble", "ensemble - members' mean"],
                ensemble_rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="work folder (default: a temporary folder)")
    parser.add_argument("--train-clips", type=int, default=600)
    parser.add_argument("--val-clips", type=int, default=200)
    parser.add_argument("--stage2-epochs", type=int, default=STAGE2_EPOCHS)
    parser.add_argument("--collect", action="store_true", help="train nothing: the section from the finished runs")
    parser.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated, among {', '.join(FUSIONS)}")
    args = parser.parse_args(argv)
    fusions = args.fusions.split(",")
    if not fusions or not set(fusions) <= set(FUSIONS) or "concat" not in fusions:
        parser.error(f"--fusions: names among {', '.join(FUSIONS)}, concat included (the others are compared to it)")
    with tempfile.TemporaryDirectory(prefix="emi-fusion-study-") as tmp:
        section = study(
            Path(args.root or tmp).resolve(),
            args.train_clips,
            args.val_clips,
            args.stage2_epochs,
            args.collect,
            fusions,
        )
    write_section(section_title(args.stage2_epochs), section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
