"""Ensembles of Stage II checkpoints, whose predictions are averaged: `emi evaluate` and `emi predict` take several
`--checkpoint`s, or an ensemble folder. A single checkpoint is an ensemble of one: both commands always go through
here.

An ensemble folder holds `ensemble.json`, {"format": "emi-ensemble/1", "members": [...]}, the member checkpoint
folders relative to the ensemble folder (or absolute); `emi ensemble --out DIR --checkpoint A --checkpoint B ...`
writes one. The members must agree on what they read and what they predict: the labels in their order, the encoders
the features come from (their sha256), how clips were prepared and the frames per clip; so the features are read or
computed once and every member runs on the same batch. Their fusion models may differ (qam and xattn, say).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emi.errors import UsageError
from emi.io import write_json_atomic
from emi.models.fusion import FUSION_CONFIG, FusionModel, fusion_encoders, fusion_inputs, load_fusion

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "emi-ensemble/1"


def members_agree(first: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What two members' config.json disagree on, of what an ensemble needs them to share."""
    differ = [key for key in ("labels", "preprocessing", "num_frames") if first[key] != other[key]]
    if first["encoders"].get("sha256") != other["encoders"].get("sha256"):
        differ.append("encoders")
    return differ


@dataclass
class Ensemble:
    checkpoints: list[Path]  # the members' folders
    models: list[FusionModel]
    config: dict[str, Any]  # the first member's config.json; the others agree on labels, encoders, preprocessing
    home: Path | None  # the ensemble folder or the single checkpoint (reports go there); None for a list

    def encoders(self) -> Path:
        """The Stage I encoders every member's features come from (the first member's copy, verified)."""
        return fusion_encoders(self.checkpoints[0], self.config)

    @torch.no_grad()
    def predictions(self, batch: dict[str, Any], present: torch.Tensor | None = None) -> torch.Tensor:
        """[members, B, K] intensities of a Stage II batch (on the models' device), on the CPU; `present` as for
        emi.models.fusion.fusion_inputs."""
        inputs = fusion_inputs(batch, present)
        return torch.stack([model(**inputs)["pred"].float().cpu() for model in self.models])


def member_folders(checkpoints: Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    """(the member checkpoint folders, the home folder) of `--checkpoint` arguments: one checkpoint, one ensemble
    folder, or several checkpoints (home None)."""
    if not checkpoints:
        raise UsageError("no checkpoint given")
    if len(checkpoints) == 1:
        folder = Path(checkpoints[0])
        listing = folder / ENSEMBLE_FILE
        if not listing.is_file():
            return [folder], folder
        try:
            document = json.loads(listing.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{listing}: not readable JSON ({err})") from None
        members = document.get("members") if isinstance(document, dict) else None
        if document.get("format") != ENSEMBLE_FORMAT or not isinstance(members, list) or not members or not all(
                isinstance(member, str) for member in members):
            raise UsageError(f"{listing}: expected {{'format': {ENSEMBLE_FORMAT!r}, 'members': [checkpoint folders]}}")
        return [folder / member for member in members], folder
    for checkpoint in checkpoints:
        if (Path(checkpoint) / ENSEMBLE_FILE).is_file():
            raise UsageError(f"{checkpoint} is an ensemble folder: give it alone, or its members")
    return [Path(checkpoint) for checkpoint in checkpoints], None


def load_ensemble(checkpoints: Sequence[str | Path], device: torch.device | str = "cpu") -> Ensemble:
    """The members of `checkpoints` (see `member_folders`) in eval mode on `device`; UsageError naming a member that
    is not a usable checkpoint or disagrees with the first."""
    folders, home = member_folders(checkpoints)
    models, configs = zip(*(load_fusion(folder, device) for folder in folders))
    for folder, config in zip(folders[1:], configs[1:]):
        differ = members_agree(configs[0], config)
        if differ:
            raise UsageError(f"{folder / FUSION_CONFIG}: differs from {folders[0]} in {differ}; the members of an "
                             "ensemble must read the same features and predict the same labels")
    return Ensemble(folders, list(models), configs[0], home)


def write_ensemble(folder: str | Path, checkpoints: Sequence[str | Path]) -> Path:
    """An ensemble folder listing `checkpoints` (relative to it, so that moving both together keeps it working),
    after checking that they load and agree; returns the ensemble.json written."""
    folder = Path(folder)
    if (folder / ENSEMBLE_FILE).exists():
        raise UsageError(f"{folder / ENSEMBLE_FILE} exists; choose a new folder")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: not a folder")
    load_ensemble(checkpoints)
    folder.mkdir(parents=True, exist_ok=True)
    members = [os.path.relpath(Path(checkpoint).resolve(), folder.resolve()) for checkpoint in checkpoints]
    write_json_atomic(folder / ENSEMBLE_FILE, {"format": ENSEMBLE_FORMAT, "members": members})
    return folder / ENSEMBLE_FILE
