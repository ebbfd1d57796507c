"""A sweep's results from its finished cells: results.csv and results.md (per variant: mean and std over the
repeats of every val metric; the best variant and the best cell), cells.csv, the top-k ensemble (ensemble.json) and
TensorBoard HParams (hparams/)."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from emi.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from emi.io import write_atomic, write_json_atomic
from emi.metrics import emi_report
from emi.serve.ensemble import load_ensemble
from emi.serve.scoring import shard_predictions
from emi.sweep.plan import DATA_IDENTITY, DATASET, Cell, Sweep, override


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def config_value(config: Any, key: str) -> Any:
    """The value of a dotted key (`model.fusion`) in a config."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def ensemble_report(checkpoints: list[Path], shards: str) -> dict[str, Any]:
    """Score the mean of the checkpoints' predictions on labelled feature shards, clip by clip (as `emi evaluate`
    with several checkpoints does); UsageError where they do not read the same features or predict the same
    labels."""
    ensemble = load_ensemble(checkpoints)
    _, preds, target, _ = shard_predictions(ensemble, shards, workers=0)
    return emi_report(preds.mean(0), target, ensemble.record.labels)


def top_k_ensemble(sweep: Sweep, ranked: list[Cell]) -> dict[str, Any] | None:
    """The mean prediction of the k best cells that trained and validated on the same clips as the best one,
    scored on its val set."""
    if sweep.config.top_k == 0 or not ranked:
        return None

    def clips(cell: Cell) -> dict[str, Any]:
        return {key: getattr(cell.config.data, key) for key in DATA_IDENTITY}

    best = ranked[0]
    members = [cell for cell in ranked if clips(cell) == clips(best)][: sweep.config.top_k]
    shards = best.config.data.val
    result: dict[str, Any] = {"members": [cell.name for cell in members], "val": shards}
    if best.config.data.folds >= 2:  # their val set is a fold of train + val, not data.val
        result["error"] = "the cells validate on k-fold splits; ensemble a fold's cells with emi evaluate"
        return result
    try:
        result["report"] = ensemble_report([cell.run_dir / "best" for cell in members], shards)
    except UsageError as err:
        result["error"] = str(err)
    return result


def write_hparams(sweep: Sweep, cells: list[Cell], metrics: dict[str, dict[str, float]]) -> None:
    """One TensorBoard HParams session per finished cell under <sweep>/hparams (written afresh each time): every
    swept key with its value in that cell, and its val metrics."""
    folder = sweep.folder / "hparams"
    shutil.rmtree(folder, ignore_errors=True)
    keys = list(dict.fromkeys(key for cell in cells for key in cell.settings if key != DATASET))
    with SummaryWriter(str(folder)) as writer:
        for cell in cells:
            if cell.name not in metrics:
                continue
            values = {key: config_value(cell.config, key) for key in keys}
            hparams = {
                "variant": cell.variant,
                DATASET: cell.dataset,
                **{
                    key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
                    for key, value in values.items()
                },
            }
            writer.add_hparams(
                hparams, {f"val/{name}": value for name, value in metrics[cell.name].items()}, run_name=cell.name
            )


def csv_text(header: list[str], rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def shown(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def collect(sweep: Sweep, cells: list[Cell]) -> int:
    """Write the sweep's results from its finished cells; EXIT_PARTIAL when some cells are not finished."""
    config = sweep.config
    metrics = {cell.name: cell.metrics() for cell in cells if cell.finished()}
    names = list(dict.fromkeys([config.metric] + [name for values in metrics.values() for name in values]))
    missing = [cell.name for cell in cells if cell.name in metrics and config.metric not in metrics[cell.name]]
    if missing:
        raise UsageError(
            f"{sweep.source}: metric {config.metric!r} is not among the val metrics of {missing[0]} "
            f"({', '.join(metrics[missing[0]])})"
        )
    variants: dict[str, list[Cell]] = {}
    for cell in cells:
        variants.setdefault(cell.variant, []).append(cell)
    summary = {}
    for variant, members in variants.items():
        done = [metrics[cell.name] for cell in members if cell.name in metrics]
        summary[variant] = {name: mean_std([m[name] for m in done if name in m]) for name in names} if done else {}
    ranked = sorted((cell for cell in cells if cell.name in metrics), key=lambda c: -metrics[c.name][config.metric])
    ensemble = top_k_ensemble(sweep, ranked)

    repeat_keys = list(config.repeat)
    write_atomic(
        sweep.folder / "cells.csv",
        csv_text(
            ["cell", "variant", DATASET, *repeat_keys, "status", "run_dir", *names],
            [
                [
                    cell.name,
                    cell.variant,
                    cell.dataset,
                    *(cell.settings[key] for key in repeat_keys),
                    "finished" if cell.name in metrics else "not finished",
                    str(cell.run_dir),
                    *(metrics.get(cell.name, {}).get(name, "") for name in names),
                ]
                for cell in cells
            ],
        ),
    )
    write_atomic(
        sweep.folder / "results.csv",
        csv_text(
            [
                "variant",
                DATASET,
                "settings",
                "cells",
                "finished",
                *(f"{n}_{s}" for n in names for s in ("mean", "std")),
            ],
            [
                [
                    variant,
                    members[0].dataset,
                    variant_settings(members[0], repeat_keys),
                    len(members),
                    sum(cell.name in metrics for cell in members),
                    *(
                        ("" if value is None else value)
                        for name in names
                        for value in summary[variant].get(name, ("", ""))
                    ),
                ]
                for variant, members in variants.items()
            ],
        ),
    )
    if ensemble is not None:
        write_json_atomic(sweep.folder / "ensemble.json", ensemble)
    if metrics:
        write_hparams(sweep, cells, metrics)
    markdown = results_markdown(sweep, cells, variants, summary, metrics, ranked, ensemble)
    write_atomic(sweep.folder / "results.md", markdown.encode())
    print(markdown, flush=True)
    return EXIT_OK if len(metrics) == len(cells) else EXIT_PARTIAL


def variant_settings(cell: Cell, repeat_keys: list[str]) -> str:
    """The settings that make a variant, as `key=value` (the repeat keys left out)."""
    return ", ".join(
        override(key, value) if key != DATASET else f"{key}={value}"
        for key, value in cell.settings.items()
        if key not in repeat_keys
    )


def results_markdown(
    sweep: Sweep,
    cells: list[Cell],
    variants: dict[str, list[Cell]],
    summary: dict[str, dict[str, tuple[float, float | None]]],
    metrics: dict[str, dict[str, float]],
    ranked: list[Cell],
    ensemble: dict[str, Any] | None,
) -> str:
    config = sweep.config
    columns = list(dict.fromkeys([config.metric, "mean_pearson", "mse"]))
    repeats = " x ".join(f"{key} ({len(values)})" for key, values in config.repeat.items())
    lines = [
        f"# Sweep {config.name}",
        "",
        f"{len(cells)} cells ({len(variants)} variants"
        + (f" x {repeats}" if repeats else "")
        + f") from {sweep.source}, each a Stage II run of {sweep.base} with its settings; {len(metrics)} "
        f"finished. Val metrics of each cell's best epoch; mean ± sample std over the repeats.",
        "",
        "| variant | data | settings | cells | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for variant, members in variants.items():
        done = sum(cell.name in metrics for cell in members)
        values = [shown(*summary[variant][name]) if name in summary[variant] else "-" for name in columns]
        lines.append(
            f"| {variant} | {members[0].dataset} | {variant_settings(members[0], list(config.repeat))} | "
            f"{done}/{len(members)} | " + " | ".join(values) + " |"
        )
    lines.append("")
    if ranked:
        best_variant = max((v for v in summary if summary[v]), key=lambda v: summary[v][config.metric][0])
        best = ranked[0]
        lines.append(
            f"Best variant by mean val {config.metric}: **{best_variant}** "
            f"({shown(*summary[best_variant][config.metric])}). Best cell: **{best.name}** "
            f"({metrics[best.name][config.metric]:.4f}, {best.run_dir / 'best'})."
        )
    if ensemble is not None:
        members = ", ".join(ensemble["members"])
        if "report" in ensemble:
            report = ensemble["report"]
            lines.append(
                f"Top-{len(ensemble['members'])} ensemble (the mean prediction of {members}, on "
                f"{ensemble['val']}, {report['num_samples']} clips): mean_pearson "
                f"{report['mean_pearson']:.4f}, mse {report['mse']:.4f}."
            )
        else:
            lines.append(f"Top-k ensemble of {members}: not computed ({ensemble['error']}).")
    unfinished = [cell.name for cell in cells if cell.name not in metrics]
    if unfinished:
        lines.append(
            f"Not finished ({len(unfinished)}): {', '.join(unfinished)}. Run the same `emi sweep` again to "
            "continue them."
        )
    return "\n".join(lines) + "\n"
