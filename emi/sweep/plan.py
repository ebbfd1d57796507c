"""A sweep file's cells: loading and checking the file, expanding it into cells (each one Stage II run in its own
folder, named from its settings), and the folder of a cell that ran before."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emi.config import (
    Stage2Config,
    SweepConfig,
    build_config,
    config_to_dict,
    parse_override,
    read_config_file,
    resolve_config_path,
    set_dotted,
)
from emi.errors import UsageError
from emi.models.options import check_fusion_options

DATASET = "dataset"  # the key of a cell or grid that picks one of the sweep's `data`
SET_BY_SWEEP = ("run.name", "run.output_dir", "data.train", "data.val")  # the cell's folder and its `data`
NOT_COMPARED = ("train.resume", "train.trust_checkpoint")  # how a cell (re)starts, not what it trains
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NOT_METRICS = ("step", "epoch", "num_samples")  # trainer.json entries that are not val metrics
DATA_IDENTITY = ("train", "val", "manifest", "folds", "fold")  # the data keys that decide which clips a run sees


@dataclass
class Sweep:
    config: SweepConfig
    source: str  # the sweep file, for messages
    folder: Path  # <output_dir>/<name>
    base: Path  # the Stage II config every cell starts from: config.base found beside the sweep file, or shipped


@dataclass(eq=False)  # compared and hashed by identity: one object per cell
class Cell:
    name: str  # <variant> or <variant>/<repeat>: its run folder below <sweep>/cells
    variant: str
    dataset: str
    settings: dict[str, Any]  # what it was given beyond `overrides`: its named cell's, grid and repeat values
    overrides: list[str]  # the Stage II command-line overrides, in order
    config: Stage2Config  # the resolved Stage II config it trains with
    run_dir: Path

    def metrics(self) -> dict[str, float]:
        """The val metrics of its best epoch (best/trainer.json)."""
        best = json.loads((self.run_dir / "best" / "trainer.json").read_text())
        return {key: value for key, value in best.items() if key not in NOT_METRICS}

    def finished(self) -> bool:
        return all((self.run_dir / folder / "trainer.json").is_file() for folder in ("export", "best"))


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file (a path or a shipped name); `overrides` are `key=value` on the sweep file itself
    (see `set_sweep_key`)."""
    path = resolve_config_path(path)
    raw = read_config_file(path)
    for override in overrides:
        set_sweep_key(raw, *parse_override(override), override)
    config = build_config(SweepConfig, raw, str(path))
    check_sweep(config, str(path))
    try:
        base = Path(os.path.abspath(resolve_config_path(config.base, beside=Path(path).parent)))
    except UsageError as err:
        raise UsageError(f"{path}: base: {err}") from None
    return Sweep(config, str(path), Path(config.output_dir) / config.name, base)


def set_sweep_key(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    """As emi.config.set_dotted, except that below `overrides`, `grid`, `repeat` and `cells.NAME` the rest of the
    key is one run-config key: `overrides.train.epochs=3`, `grid.model.fusion=[qam,mean]`, `cells.full.run.seed=1`."""
    head, _, rest = key.partition(".")
    if head == "cells" and "." in rest:
        name, _, rest = rest.partition(".")
        cells = raw.setdefault("cells", {})
        section = cells.setdefault(name, {}) if isinstance(cells, dict) else None
    elif head in ("overrides", "grid", "repeat") and rest:
        section = raw.setdefault(head, {})
    else:
        set_dotted(raw, key, value, override)
        return
    if not isinstance(section, dict):
        raise UsageError(f"override {override!r}: {key.rsplit('.', 1)[0]} is not a mapping")
    section[rest] = value


def check_sweep(config: SweepConfig, source: str) -> None:
    """A UsageError naming `source` and the key for the first thing wrong in a sweep file."""
    _check_names_and_data(config, source)
    _check_settings(config, source)
    _check_ranking_and_slurm(config, source)


def _check_names_and_data(config: SweepConfig, source: str) -> None:
    if not config.base:
        raise UsageError(
            f"{source}: base names no Stage II config: give the file every cell starts from (relative "
            "to the sweep file, or a shipped name such as stage2/tiny.yaml)"
        )
    for what, name in (
        [("name", config.name)] + [("data", name) for name in config.data] + [("cells", name) for name in config.cells]
    ):
        if not NAME.fullmatch(str(name)):
            raise UsageError(f"{source}: {what} {name!r}: use letters, digits and . _ + - (it names folders)")
    if not config.data:
        raise UsageError(
            f"{source}: data names no feature shards; give at least one: data: {{NAME: {{train: DIR, val: DIR}}}}"
        )
    for name, data in config.data.items():
        if not data.train or not data.val:
            raise UsageError(f"{source}: data.{name} needs both train and val (cells are ranked on val)")


def _check_settings(config: SweepConfig, source: str) -> None:
    sections = {
        "overrides": config.overrides,
        "grid": config.grid,
        "repeat": config.repeat,
        **{f"cells.{name}": settings for name, settings in config.cells.items()},
    }
    for where, settings in sections.items():
        for key in settings:
            if key in SET_BY_SWEEP:
                raise UsageError(
                    f"{source}: {where}.{key}: the sweep sets {key} itself (the cell's folder, or "
                    f"the data the cell's `{DATASET}` names)"
                )
            if key == DATASET and where in ("overrides", "repeat"):
                raise UsageError(f"{source}: {where}.{DATASET}: a cell's data is chosen in cells or grid")
    for where in ("grid", "repeat"):
        for key, values in getattr(config, where).items():
            if not values:
                raise UsageError(f"{source}: {where}.{key} has no values")
    datasets = [settings[DATASET] for settings in config.cells.values() if DATASET in settings]
    for name in datasets + list(config.grid.get(DATASET, [])):
        if name not in config.data:
            raise UsageError(f"{source}: {DATASET} {name!r} is not one of data: {list(config.data)}")
    for name, settings in config.cells.items():
        for key in settings:
            if key in config.grid or key in config.repeat:
                raise UsageError(
                    f"{source}: {key} is set both in cells.{name} and in "
                    f"{'grid' if key in config.grid else 'repeat'}; set it in one place"
                )
    both = sorted(set(config.grid) & set(config.repeat))
    if both:
        raise UsageError(f"{source}: {both[0]} is both in grid and in repeat; set it in one place")


def _check_ranking_and_slurm(config: SweepConfig, source: str) -> None:
    if not (config.metric.startswith("pearson/") or config.metric.startswith("mean_pearson")):
        raise UsageError(
            f"{source}: metric {config.metric!r}: rank by a val Pearson metric (mean_pearson, "
            "mean_pearson_without_<modality>, pearson/<label>): higher is better"
        )
    slurm = config.slurm
    if (
        config.top_k < 0
        or slurm.nodes < 1
        or slurm.gpus_per_node < 0
        or slurm.time < 1
        or slurm.parallelism < 0
        or (slurm.cpus_per_node is not None and slurm.cpus_per_node < 1)
    ):
        raise UsageError(
            f"{source}: need top_k >= 0, slurm.nodes >= 1, slurm.gpus_per_node >= 0, slurm.time >= 1, "
            f"slurm.parallelism >= 0 and slurm.cpus_per_node >= 1 (or null)"
        )


def override(key: str, value: Any) -> str:
    """`key=value` as the stage's command line reads it back (YAML), whatever the value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def slug(value: Any) -> str:
    """A value as a piece of a folder name: lists joined with '+', YAML spelling (true, null), unsafe characters
    replaced with '-'."""
    if isinstance(value, list):
        return "+".join(slug(item) for item in value)
    text = value if isinstance(value, str) else override("", value)[1:]
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def labels(keys: list[str]) -> dict[str, str]:
    """Short names of dotted keys for cell names: the last part (`run.seed` -> `seed`), or the whole key where two
    keys end alike."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis slowest ([{}] for no axes)."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def expand(sweep: Sweep) -> list[Cell]:
    """The sweep's cells, in a fixed order: named cells (in file order) x grid points x repeats. Each cell's Stage
    II config is built and checked here, so a bad key or value fails before anything runs."""
    config, source = sweep.config, sweep.source
    base = read_config_file(sweep.base)
    grid_labels, repeat_labels = labels(list(config.grid)), labels(list(config.repeat))

    def resolved(overrides: list[str], where: str) -> Stage2Config:
        """The Stage II config of these overrides, checked as its run would check it, the model's shape included."""
        raw = copy.deepcopy(base)
        for text in overrides:
            set_dotted(raw, *parse_override(text), text)
        config = build_config(Stage2Config, raw, f"{source}: {where}")
        try:
            check_fusion_options(config.model)
        except UsageError as err:
            raise UsageError(f"{source}: {where}: {err}") from None
        return config

    # Each section on its own first, so that a bad key is named where it is written.
    common = [override(key, value) for key, value in config.overrides.items()]
    resolved(common, "overrides")
    for where, settings in [
        *((f"cells.{name}", s) for name, s in config.cells.items()),
        *((f"grid.{key}", {key: v}) for key, values in config.grid.items() for v in values),
        *((f"repeat.{key}", {key: v}) for key, values in config.repeat.items() for v in values),
    ]:
        resolved(common + [override(key, value) for key, value in settings.items() if key != DATASET], where)

    cells: list[Cell] = []
    named = config.cells or {"": {}}
    for (cell_name, cell_settings), point in itertools.product(named.items(), product(config.grid)):
        variant = (
            "_".join(
                [cell_name] * bool(cell_name) + [f"{grid_labels[key]}-{slug(value)}" for key, value in point.items()]
            )
            or "base"
        )
        dataset = point.get(DATASET, cell_settings.get(DATASET, next(iter(config.data))))
        data = config.data[dataset]
        for repeat in product(config.repeat):
            repeat_name = "_".join(f"{repeat_labels[key]}-{slug(value)}" for key, value in repeat.items())
            name = f"{variant}/{repeat_name}" if repeat_name else variant
            folder = sweep.folder / "cells" / variant
            run = (
                {"run.output_dir": str(folder), "run.name": repeat_name}
                if repeat_name
                else {"run.output_dir": str(folder.parent), "run.name": variant}
            )
            settings = {**cell_settings, **point, **repeat}
            overrides = (
                common
                + [override("data.train", data.train), override("data.val", data.val)]
                + [override(key, value) for key, value in {**settings, **run}.items() if key != DATASET]
            )
            cells.append(
                Cell(
                    name=name,
                    variant=variant,
                    dataset=dataset,
                    settings=settings,
                    overrides=overrides,
                    config=resolved(overrides + ["train.resume=latest"], f"cell {name}"),
                    run_dir=folder / repeat_name if repeat_name else folder,
                )
            )
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in seen:
            raise UsageError(
                f"{source}: two cells are both named {cell.name!r} ({seen[cell.name].settings} and "
                f"{cell.settings}): values that differ only in characters a folder name cannot hold"
            )
        seen[cell.name] = cell
    return cells


def dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_run_folder(cell: Cell, source: str) -> None:
    """A cell's folder that holds a run must hold this cell's run: the same config (UsageError otherwise), so that
    a changed sweep file never mixes old and new results or resumes a run under other settings. Keys the saved
    config lacks (added to the schema since) are not compared."""
    saved = cell.run_dir / "config.yaml"
    if not saved.is_file():
        return
    there, here = dotted(yaml.safe_load(saved.read_text()) or {}), dotted(config_to_dict(cell.config))
    differing = [key for key in sorted(there) if key not in NOT_COMPARED and there[key] != here.get(key)]
    if differing:
        shown = "; ".join(f"{key}: {there.get(key)!r} there, {here.get(key)!r} now" for key in differing[:5])
        raise UsageError(
            f"{source}: {cell.run_dir} holds a run of cell {cell.name} with other settings ({shown}): "
            "give the sweep another name (name=...), or remove that folder to train it again"
        )
