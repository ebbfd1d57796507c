"""`emi evaluate`: a checkpoint or an ensemble scored on labelled feature or clip shards.

    emi evaluate --checkpoint runs/<stage2>/best --shards data/features/val     # or clip shards
    emi evaluate --checkpoint runs/a/best --checkpoint runs/b/best --shards ... --out report.json  # an ensemble
    emi evaluate --checkpoint runs/<stage2>/best --shards ... --drop audio      # robustness: audio removed

Feature shards are read as Stage II training reads them, clip shards go through the checkpoint's encoders
(emi.serve.scoring), so both give the same numbers up to the float16 storage of the features. The report (JSON), a
figure beside it and TensorBoard scalars are written by rank 0.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from emi import storage
from emi.devices import process_state
from emi.errors import UsageError
from emi.metrics import emi_report
from emi.serve.ensemble import load_ensemble
from emi.serve.robustness import check_modalities
from emi.serve.scoring import check_batching, checkpoint_list, shard_predictions


def shards_name(shards: str) -> str:
    """The name of the (first) shard folder a spec names: `data/features/val` -> `val`."""
    first = shards.split("::")[0].strip()
    if storage.is_url(first):  # s3://bucket/features/val, or .../val/val-{000000..000003}.tar
        parts = first.rstrip("/").split("/")
        return parts[-2] if re.search(r"\.(tar|tgz)\b|\{", parts[-1]) else parts[-1]
    return Path(first).name if os.path.isdir(first) else Path(os.path.abspath(first)).parent.name


def write_figure(pred: np.ndarray, target: np.ndarray, labels: list[str], report: dict, path: str | Path) -> None:
    """Predicted against true intensity per emotion: a grid of scatter plots (3 per row) with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    rows = math.ceil(len(labels) / 3)
    figure, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(labels):
            axis.axis("off")
            continue
        name = labels[index]
        axis.scatter(target[:, index], pred[:, index], s=12, alpha=0.7)
        axis.plot([0, 1], [0, 1], color="grey", linewidth=1)
        axis.set(
            xlim=(-0.02, 1.02),
            ylim=(-0.02, 1.02),
            xlabel="true",
            ylabel="predicted",
            title=f"{name}  r = {report[f'pearson/{name}']:.3f}",
        )
    figure.suptitle(
        f"mean Pearson {report['mean_pearson']:.3f}, MSE {report['mse']:.4f}, {report['num_samples']} clips"
    )
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, dpi=100, format="png")
    plt.close(figure)
    storage.write_bytes(path, png.getvalue())  # whole: never a half-written figure under the real name


def evaluate(
    checkpoint: str | Path | Sequence[str | Path],
    shards: str,
    out: str | Path | None = None,
    batch_size: int = 8,
    tb: str | Path | None = None,
    workers: int = 1,
    manifest: str | Path | None = None,
    drop: Sequence[str] = (),
    corrupt: Sequence[str] = (),
) -> dict[str, Any]:
    """Score a checkpoint, or an ensemble (emi.serve.ensemble), on labelled shards: the ensemble's report (also
    written as JSON, a PNG beside it and TensorBoard scalars `eval/<name>/...`, where name is the shard folder's, with
    `-drop-<m>`/`-corrupt-<m>` appended for a robustness evaluation) with each member's scores under "members", and
    the checkpoint, shards, dropped and corrupted modalities it came from. `num_skipped` counts the clips that could
    not be read (the command line then exits EXIT_PARTIAL). On several ranks (accelerate launch -m emi.cli evaluate)
    each rank scores its share of the clips and rank 0 writes the files; every rank returns the report."""
    check_batching(batch_size, workers)
    check_modalities(drop, corrupt)
    state = process_state()
    device = state.device
    ensemble = load_ensemble(checkpoint_list(checkpoint), device)
    if out is None and ensemble.home is None:
        raise UsageError(
            "several --checkpoint: give --out for the report (or list them in an ensemble folder with "
            "`emi ensemble`, whose eval/ folder then holds it)"
        )
    if ensemble.home is None and tb is None and storage.is_url(out):
        raise UsageError(f"--out {out}: with several --checkpoint and a URL for the report, give --tb (a local folder)")
    keys, preds, target, skipped = shard_predictions(
        ensemble, shards, batch_size, workers, device, manifest, drop, corrupt, state
    )
    if len(keys) < 2:
        raise UsageError(f"{shards}: {len(keys)} clip(s); Pearson correlation needs at least 2")
    labels = ensemble.record.labels
    pred = preds.mean(0)
    report = {**emi_report(pred, target, labels), "num_skipped": skipped}
    members = [
        {
            "checkpoint": str(folder.resolve()),
            **{key: value for key, value in emi_report(member, target, labels).items() if key != "num_samples"},
        }
        for folder, member in zip(ensemble.checkpoints, preds)
    ]
    name = shards_name(shards) + "".join(f"-drop-{m}" for m in drop) + "".join(f"-corrupt-{m}" for m in corrupt)
    out = str(out) if out is not None else str(ensemble.home / "eval" / f"{name}.json")
    result = {
        **report,
        "members": members,
        "drop": list(drop),
        "corrupt": list(corrupt),
        "checkpoint": str(ensemble.home.resolve()) if ensemble.home is not None else None,
        "shards": storage.shown(shards),
    }
    figure = (out[: -len(".json")] if out.endswith(".json") else out) + ".png"
    if tb is None:
        tb = ensemble.home / "eval" / "tb" if ensemble.home is not None else Path(out).parent / "tb"
    if state.is_main_process:  # rank 0 writes; every rank returns the same report
        storage.write_bytes(out, (json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode())
        write_figure(pred.numpy(), target.numpy(), labels, report, figure)
        writer = SummaryWriter(log_dir=str(tb))
        for metric, value in report.items():
            writer.add_scalar(f"eval/{name}/{metric}", value, 0)
        writer.close()
        print(
            f"emi evaluate: report {storage.shown(out)}, figure {storage.shown(figure)}, TensorBoard scalars "
            f"eval/{name}/* in {tb}",
            file=sys.stderr,
            flush=True,
        )
    state.wait_for_everyone()
    return result
