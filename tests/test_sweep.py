"""`emi sweep`: expansion of a sweep file into cells, which cells run, the results table, and a --local sweep of
four tiny Stage II cells end to end (the Slurm run with a requeued cell is in test_slurm_sweep.py)."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import emi.sweep.report
import emi.sweep.run
from emi.cli import main
from emi.config import SHIPPED_CONFIGS, config_to_dict, parse_override
from emi.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from emi.metrics import emi_report
from emi.serve.ensemble import load_ensemble
from emi.serve.scoring import shard_predictions
from emi.sweep.plan import expand, load_sweep
from emi.sweep.report import collect, top_k_ensemble
from emi.sweep.run import run_sweep

from helpers import REPO

BASE = str(REPO / "configs/stage2/tiny.yaml")


def write_sweep(folder: Path, **sections) -> Path:
    spec = {
        "name": "s",
        "output_dir": str(folder / "out"),
        "base": BASE,
        "data": {
            "clean": {"train": "features/clean/train", "val": "features/clean/val"},
            "noisy": {"train": "features/noisy/train", "val": "features/noisy/val"},
        },
        **sections,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fake_run(cell, metrics: dict[str, float] | None) -> None:
    """A run folder as Stage II leaves it: config.yaml; with `metrics`, a finished run (best/ and export/)."""
    cell.run_dir.mkdir(parents=True)
    (cell.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cell.config), sort_keys=False))
    if metrics is not None:
        for folder in ("best", "export"):
            (cell.run_dir / folder).mkdir()
        (cell.run_dir / "best" / "trainer.json").write_text(json.dumps({"step": 9, "epoch": 3, **metrics}))
        (cell.run_dir / "export" / "trainer.json").write_text(json.dumps({"step": 9, "epoch": 3}))


def test_named_cells_cross_the_grid_and_every_variant_runs_each_repeat(tmp_path):
    path = write_sweep(
        tmp_path,
        overrides={"train.epochs": 5, "optim.lr": 1e-5},
        cells={"full": {}, "no-tfe": {"model.temporal": False, "dataset": "noisy"}},
        grid={"model.modalities": [["vision", "audio"], ["text"]]},
        repeat={"run.seed": [0, 1]},
    )
    sweep = load_sweep(path)
    cells = expand(sweep)
    assert [cell.name for cell in cells] == [
        f"{cell}_modalities-{modalities}/seed-{seed}"
        for cell in ("full", "no-tfe")
        for modalities in ("vision+audio", "text")
        for seed in (0, 1)
    ]
    cell = cells[5]  # no-tfe, [vision, audio], seed 1
    folder = tmp_path / "out" / "s" / "cells" / "no-tfe_modalities-vision+audio"
    assert (cell.variant, cell.dataset, cell.run_dir) == ("no-tfe_modalities-vision+audio", "noisy", folder / "seed-1")
    assert cell.settings == {
        "model.temporal": False,
        "dataset": "noisy",
        "model.modalities": ["vision", "audio"],
        "run.seed": 1,
    }
    assert cell.overrides == [
        "train.epochs=5",
        "optim.lr=1.0e-05",
        "data.train=features/noisy/train",
        "data.val=features/noisy/val",
        "model.temporal=false",
        "model.modalities=[vision, audio]",
        "run.seed=1",
        f"run.output_dir={folder}",
        "run.name=seed-1",
    ]
    assert dict(map(parse_override, cell.overrides))["model.modalities"] == ["vision", "audio"]  # as the stage reads it
    config = cell.config
    assert (
        config.train.epochs,
        config.optim.lr,
        config.model.temporal,
        config.run.seed,
        config.model.modalities,
        config.data.train,
        config.train.resume,
    ) == (5, 1e-5, False, 1, ["vision", "audio"], "features/noisy/train", "latest")
    assert cells[0].config.model.temporal is True and cells[0].dataset == "clean"  # the base's, the first data
    assert [(c.name, c.overrides, c.run_dir) for c in expand(load_sweep(path))] == [
        (c.name, c.overrides, c.run_dir) for c in cells
    ]  # deterministic


def test_a_grid_alone_names_variants_by_its_values_and_needs_no_repeat(tmp_path):
    cells = expand(load_sweep(write_sweep(tmp_path, grid={"model.fusion": ["qam", "mean"], "optim.lr": [0.001]})))
    assert [(cell.name, cell.run_dir.name) for cell in cells] == [
        ("fusion-qam_lr-0.001", "fusion-qam_lr-0.001"),
        ("fusion-mean_lr-0.001", "fusion-mean_lr-0.001"),
    ]
    assert cells[0].run_dir.parent == tmp_path / "out" / "s" / "cells"
    assert [cell.name for cell in expand(load_sweep(write_sweep(tmp_path)))] == ["base"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"gird": {"model.fusion": ["qam"]}}, "unknown key 'gird' in the top level"),
        ({"grid": {"model.fusio": ["qam"]}}, "grid.model.fusio: unknown key 'model.fusio' in model"),
        ({"cells": {"a": {"optim.lrr": 1}}}, "cells.a: unknown key 'optim.lrr' in optim"),
        ({"overrides": {"train.epoch": 1}}, "overrides: unknown key 'train.epoch' in train"),
        ({"repeat": {"run.seed": ["one"]}}, "repeat.run.seed: run.seed must be int, got 'one'"),
        ({"grid": {"model.fusion": ["qam", "sum"]}}, "grid.model.fusion: model.fusion is 'sum'"),
        ({"grid": {"model.fusion": "qam"}}, "grid.model.fusion must be a list, got 'qam'"),
        ({"repeat": {"run.seed": []}}, "repeat.run.seed has no values"),
        ({"overrides": {"run.name": "x"}}, "overrides.run.name: the sweep sets run.name itself"),
        ({"cells": {"a": {"data.val": "x"}}}, "cells.a.data.val: the sweep sets data.val itself"),
        ({"cells": {"a": {"dataset": "other"}}}, "dataset 'other' is not one of data: ['clean', 'noisy']"),
        ({"cells": {"a b": {}}}, "cells 'a b': use letters, digits"),
        (
            {"cells": {"a": {"run.seed": 1}}, "repeat": {"run.seed": [0]}},
            "run.seed is set both in cells.a and in repeat",
        ),
        ({"metric": "mse"}, "metric 'mse': rank by a val Pearson metric"),
        ({"base": "configs/stage2/none.yaml"}, "base: config file not found: configs/stage2/none.yaml (looked for "),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_the_file_and_the_key(tmp_path, sections, message):
    path = write_sweep(tmp_path, **sections)
    with pytest.raises(UsageError) as err:
        expand(load_sweep(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_the_base_is_found_beside_the_sweep_file_then_among_the_shipped_configs(tmp_path, monkeypatch):
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (tmp_path / "mine.yaml").write_text("train: {epochs: 3}\n")
    monkeypatch.chdir(folder)  # neither name is a file here
    assert load_sweep(write_sweep(folder, base="../mine.yaml")).base == tmp_path / "mine.yaml"
    shipped = load_sweep(write_sweep(folder, base="stage2/tiny.yaml"))
    assert shipped.base == SHIPPED_CONFIGS / "stage2/tiny.yaml"
    assert expand(shipped)[0].config.run.seed == 0
    assert load_sweep("sweeps/kfold.yaml").base == SHIPPED_CONFIGS / "stage2/tiny.yaml"  # a shipped sweep's own base


def test_command_line_overrides_set_sweep_keys_and_run_keys(tmp_path):
    path = write_sweep(tmp_path, overrides={"train.epochs": 60}, cells={"full": {}}, repeat={"run.seed": [0, 1, 2]})
    sweep = load_sweep(
        path,
        [
            "overrides.train.epochs=2",
            "repeat.run.seed=[5]",
            "cells.full.model.fusion=mean",
            "data.clean.train=/elsewhere/train",
            "top_k=1",
            "slurm.partition=gpu",
        ],
    )
    (cell,) = expand(sweep)
    config = cell.config
    assert (cell.name, config.train.epochs, config.model.fusion, config.data.train) == (
        "full/seed-5",
        2,
        "mean",
        "/elsewhere/train",
    )
    assert (sweep.config.top_k, sweep.config.slurm.partition) == (1, "gpu")


def test_finished_cells_are_not_run_again_and_a_changed_one_is_refused(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, grid={"model.fusion": ["qam", "mean"]}, repeat={"run.seed": [0, 1]}, top_k=0)
    cells = expand(load_sweep(path))
    fake_run(cells[0], {"mean_pearson": 0.5})  # finished
    fake_run(cells[1], None)  # started, stopped before its end: resumes
    asked = []
    monkeypatch.setattr(emi.sweep.run, "check_data", lambda sweep, cells: None)
    monkeypatch.setattr(emi.sweep.run, "run_locally", lambda sweep, cells: asked.extend(cell.name for cell in cells))
    assert main(["sweep", "--config", str(path), "--collect"]) == EXIT_PARTIAL  # runs nothing, writes the table
    assert asked == [] and "Not finished (3)" in (tmp_path / "out" / "s" / "results.md").read_text()
    assert run_sweep(path, local=True) == EXIT_PARTIAL
    assert asked == ["fusion-qam/seed-1", "fusion-mean/seed-0", "fusion-mean/seed-1"]
    assert "sweep s: 4 cells in" in capsys.readouterr().out

    # On Slurm, a cell whose job from an earlier submission is still queued is waited for, not submitted again.
    jobs = {"fusion-mean/seed-0": "7_2", "fusion-qam/seed-1": "7_1"}  # the second one has ended
    (tmp_path / "out" / "s" / "jobs.json").write_text(json.dumps(jobs))
    monkeypatch.setattr(emi.sweep.run, "queued_jobs", lambda job_ids: job_ids & {"7_2"})
    submitted = []
    monkeypatch.setattr(
        emi.sweep.run,
        "run_on_slurm",
        lambda sweep, cells, queued: submitted.append(
            ([cell.name for cell in cells], {cell.name: job for cell, job in queued.items()})
        ),
    )
    assert run_sweep(path) == EXIT_PARTIAL
    assert submitted == [(["fusion-qam/seed-1", "fusion-mean/seed-1"], {"fusion-mean/seed-0": "7_2"})]
    with (
        emi.sweep.run.sweep_lock(tmp_path / "out" / "s"),
        pytest.raises(UsageError, match="another emi sweep is running"),
    ):
        run_sweep(path)

    config = yaml.safe_load((cells[1].run_dir / "config.yaml").read_text())
    config["train"]["epochs"] = 99
    (cells[1].run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        UsageError,
        match=rf"{cells[1].run_dir} holds a run of cell fusion-qam/seed-1 with other "
        r"settings \(train.epochs: 99 there, 20 now\)",
    ):
        run_sweep(path, local=True)


def test_the_table_has_mean_and_std_over_repeats_and_the_best_cell(tmp_path):
    path = write_sweep(
        tmp_path, cells={"a": {}, "b": {"model.temporal": False}}, repeat={"run.seed": [0, 1, 2]}, top_k=0
    )
    sweep = load_sweep(path)
    cells = expand(sweep)
    scores = {"a/seed-0": 0.30, "a/seed-1": 0.40, "a/seed-2": 0.35, "b/seed-0": 0.50, "b/seed-1": 0.20}
    for cell in cells:
        fake_run(
            cell, {"mean_pearson": scores[cell.name], "mse": 1 - scores[cell.name]} if cell.name in scores else None
        )
    assert collect(sweep, cells) == EXIT_PARTIAL  # b/seed-2 did not finish

    rows = {row["variant"]: row for row in csv.DictReader((sweep.folder / "results.csv").read_text().splitlines())}
    for variant, values in (("a", [0.30, 0.40, 0.35]), ("b", [0.50, 0.20])):
        assert float(rows[variant]["mean_pearson_mean"]) == pytest.approx(statistics.mean(values))
        assert float(rows[variant]["mean_pearson_std"]) == pytest.approx(statistics.stdev(values))
        assert float(rows[variant]["mse_mean"]) == pytest.approx(1 - statistics.mean(values))
        assert (int(rows[variant]["cells"]), int(rows[variant]["finished"])) == (3, len(values))
    assert rows["b"]["settings"] == "model.temporal=false"
    statuses = {
        row["cell"]: row["status"] for row in csv.DictReader((sweep.folder / "cells.csv").read_text().splitlines())
    }
    assert statuses == {name: "finished" if name in scores else "not finished" for name in statuses}
    markdown = (sweep.folder / "results.md").read_text()
    assert "| a | clean |  | 3/3 | 0.3500 ± 0.0500 | 0.6500 ± 0.0500 |" in markdown
    assert "| b | clean | model.temporal=false | 2/3 | 0.3500 ± 0.2121 |" in markdown
    assert "Best cell: **b/seed-0** (0.5000" in markdown and "Not finished (1): b/seed-2" in markdown


def test_the_ensemble_takes_the_k_best_cells_trained_on_the_best_ones_data(tmp_path, monkeypatch):
    path = write_sweep(
        tmp_path,
        cells={"clean-a": {}, "clean-b": {"model.fusion": "mean"}, "noisy-a": {"dataset": "noisy"}},
        repeat={"run.seed": [0, 1]},
        top_k=3,
    )
    sweep = load_sweep(path)
    by_name = {cell.name: cell for cell in expand(sweep)}
    ranked = [
        by_name[name]
        for name in ("clean-a/seed-1", "noisy-a/seed-0", "clean-b/seed-0", "clean-a/seed-0", "clean-b/seed-1")
    ]
    scored = []
    monkeypatch.setattr(
        emi.sweep.report,
        "ensemble_report",
        lambda checkpoints, shards: scored.append((checkpoints, shards)) or {"mean_pearson": 0.9},
    )
    result = top_k_ensemble(sweep, ranked)
    assert result == {
        "members": ["clean-a/seed-1", "clean-b/seed-0", "clean-a/seed-0"],
        "val": "features/clean/val",
        "report": {"mean_pearson": 0.9},
    }
    assert scored == [([by_name[name].run_dir / "best" for name in result["members"]], "features/clean/val")]


def hparams(folder: Path) -> tuple[set[str], dict[str, float]]:
    """The plugins and the last value of each scalar of a TensorBoard folder."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return (
        set(events.PluginTagToContent("hparams")),
        {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]},
    )


def test_local_sweep_runs_every_cell_writes_the_table_and_skips_them_when_run_again(tiny_features, tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        data={"synth": {"train": str(tiny_features["train"]), "val": str(tiny_features["val"])}},
        overrides={"train.epochs": 1, "data.batch_size": 8},
        grid={"model.fusion": ["qam", "mean"]},
        repeat={"run.seed": [0, 1]},
        top_k=2,
        slurm={"gpus_per_node": 0, "parallelism": 2},
    )
    assert main(["sweep", "--config", str(path), "--local"]) == EXIT_OK
    sweep = load_sweep(path)
    cells = expand(sweep)
    metrics = {}
    for cell in cells:
        best = json.loads((cell.run_dir / "best" / "trainer.json").read_text())
        assert best["epoch"] == 1 and f"run {cell.run_dir}: NO world=1" in (cell.run_dir / "log.txt").read_text()
        metrics[cell.name] = best["mean_pearson"]
        plugins, scalars = hparams(sweep.folder / "hparams" / cell.name)
        assert plugins and scalars["val/mean_pearson"] == pytest.approx(best["mean_pearson"])
    assert {c.name: c.config.model.fusion for c in cells} == {
        "fusion-qam/seed-0": "qam",
        "fusion-qam/seed-1": "qam",
        "fusion-mean/seed-0": "mean",
        "fusion-mean/seed-1": "mean",
    }

    rows = {row["variant"]: row for row in csv.DictReader((sweep.folder / "results.csv").read_text().splitlines())}
    for variant in ("fusion-qam", "fusion-mean"):
        values = [metrics[f"{variant}/seed-{seed}"] for seed in (0, 1)]
        assert float(rows[variant]["mean_pearson_mean"]) == pytest.approx(statistics.mean(values))
        assert float(rows[variant]["mean_pearson_std"]) == pytest.approx(statistics.stdev(values))

    # The ensemble: the two best cells, their predictions on the val set averaged clip by clip.
    ensemble = json.loads((sweep.folder / "ensemble.json").read_text())
    assert ensemble["members"] == sorted(metrics, key=lambda name: -metrics[name])[:2]
    predictions, targets = [], {}
    for name in ensemble["members"]:
        best = sweep.folder / "cells" / name / "best"
        keys, preds, target, _ = shard_predictions(load_ensemble([best]), str(tiny_features["val"]), workers=0)
        predictions.append(dict(zip(keys, preds[0])))
        targets.update(zip(keys, target))
    keys = sorted(targets)
    mean = torch.stack([(predictions[0][key] + predictions[1][key]) / 2 for key in keys])
    expected = emi_report(mean, torch.stack([targets[key] for key in keys]), cells[0].config.labels)
    assert ensemble["report"]["num_samples"] == 16
    np.testing.assert_allclose([ensemble["report"][key] for key in expected], list(expected.values()), rtol=1e-6)
    printed = capsys.readouterr().out
    assert "| fusion-qam | synth | model.fusion=qam | 2/2 |" in printed and "Top-2 ensemble" in printed

    # Run again: every cell is finished, nothing is submitted, the same table comes out.
    table = (sweep.folder / "results.csv").read_bytes()
    logs = sorted((sweep.folder / "submitit").iterdir())
    assert main(["sweep", "--config", str(path), "--local"]) == EXIT_OK
    assert f"sweep s: 4 cells in {sweep.folder}: 4 finished, 0 still queued, 0 to run" in capsys.readouterr().out
    assert sorted((sweep.folder / "submitit").iterdir()) == logs
    assert (sweep.folder / "results.csv").read_bytes() == table


def test_the_shipped_ablation_sweep_runs_every_fusion_on_noisy_audio():
    cells = expand(load_sweep(REPO / "configs/sweeps/ablation.yaml"))
    noisy = [cell for cell in cells if cell.dataset == "audio-noise"]
    assert sorted({cell.config.model.fusion for cell in noisy}) == ["concat", "late", "mean", "qam", "xattn"]
    assert len(noisy) == 5 * 3 and len(cells) == 14 * 3  # three seeds each


def test_the_shipped_kfold_sweep_runs_every_seed_on_every_fold_of_train_and_val():
    cells = expand(load_sweep(REPO / "configs/sweeps/kfold.yaml"))
    for fusion in ("qam", "late"):
        runs = [cell.config for cell in cells if cell.config.model.fusion == fusion]
        assert sorted((run.run.seed, run.data.fold) for run in runs) == [
            (seed, fold) for seed in range(5) for fold in range(5)
        ]
        assert {(run.data.folds, run.data.train, run.data.val) for run in runs} == {
            (5, "data/features/train", "data/features/val")
        }
    assert len(cells) == 50 and len({cell.run_dir for cell in cells}) == 50


def test_a_cell_the_model_cannot_build_is_refused_before_anything_runs(tiny_features, tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        data={"synth": {"train": str(tiny_features["train"]), "val": str(tiny_features["val"])}},
        cells={"ok": {}, "heads": {"model.transformer_heads": 5, "model.d_model": 64}},
        slurm={"gpus_per_node": 0},
    )
    assert main(["sweep", "--config", str(path), "--local"]) == 2
    error = capsys.readouterr().err
    assert f"{path}: cells.heads: model.d_model 64 is not divisible by model.transformer_heads 5" in error
    assert not (tmp_path / "out" / "s").exists()  # nothing was submitted, nothing written


def test_a_cell_that_fails_as_it_runs_is_reported_with_its_reason_and_a_log_that_exists(
    tiny_features, tmp_path, capsys
):
    """A cell whose batches cannot fill one optimizer step passes every check and fails in its trainer: the sweep
    says why in one line, naming logs that are there, and exits 3 with the other cell's table."""
    path = write_sweep(
        tmp_path,
        data={"synth": {"train": str(tiny_features["train"]), "val": str(tiny_features["val"])}},
        overrides={"train.epochs": 1, "data.batch_size": 8},
        cells={"ok": {}, "accum": {"train.grad_accum": 1000}},
        slurm={"gpus_per_node": 0},
    )
    assert main(["sweep", "--config", str(path), "--local"]) == EXIT_PARTIAL
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("cell accum: ended before finishing"))
    assert "cannot fill one optimizer step with grad_accum=1000" in line, line
    logs = re.search(r"\(see (.+)\)$", line).group(1).split(" and ")
    assert logs and all(Path(log).is_file() for log in logs)
    assert "cell ok: finished" in printed
