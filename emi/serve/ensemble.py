"""Ensembles of Stage II checkpoints, whose predictions are averaged: `emi evaluate` and `emi predict` take several
`--checkpoint`s, or an ensemble folder (its member list: emi.formats.ensemble). A single checkpoint is an ensemble of
one: both commands always go through here.

The members must agree on what they read and what they predict: the labels in their order, the encoders the features
come from (their sha256), how clips were prepared and the frames per clip; so the features are read or computed once
and every member runs on the same batch. Their fusion models may differ (qam and xattn, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emi.errors import UsageError
from emi.formats.ensemble import ENSEMBLE_FILE, read_ensemble_record, write_ensemble_record
from emi.formats.fusion import FUSION_CONFIG, FusionRecord
from emi.models.fusion import FusionModel, fusion_inputs
from emi.models.fusion_checkpoint import fusion_encoders, load_fusion


def members_agree(first: FusionRecord, other: FusionRecord) -> list[str]:
    """What two members' records disagree on, of what an ensemble needs them to share."""
    differ = [key for key in ("labels", "preprocessing", "num_frames") if getattr(first, key) != getattr(other, key)]
    if first.encoders.sha256 != other.encoders.sha256:
        differ.append("encoders")
    return differ


@dataclass
class Ensemble:
    checkpoints: list[Path]  # the members' folders
    models: list[FusionModel]
    record: FusionRecord  # the first member's; the others agree on labels, encoders, preprocessing, frames
    home: Path | None  # the ensemble folder or the single checkpoint (reports go there); None for a list

    def encoders(self) -> Path:
        """The Stage I encoders every member's features come from (the first member's copy, verified)."""
        return fusion_encoders(self.checkpoints[0], self.record)

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
        members = read_ensemble_record(folder)
        return (members, folder) if members is not None else ([folder], folder)
    for checkpoint in checkpoints:
        if (Path(checkpoint) / ENSEMBLE_FILE).is_file():
            raise UsageError(f"{checkpoint} is an ensemble folder: give it alone, or its members")
    return [Path(checkpoint) for checkpoint in checkpoints], None


def load_ensemble(checkpoints: Sequence[str | Path], device: torch.device | str = "cpu") -> Ensemble:
    """The members of `checkpoints` (see `member_folders`) in eval mode on `device`; UsageError naming a member that
    is not a usable checkpoint or disagrees with the first."""
    folders, home = member_folders(checkpoints)
    models, records = zip(*(load_fusion(folder, device) for folder in folders))
    for folder, record in zip(folders[1:], records[1:]):
        differ = members_agree(records[0], record)
        if differ:
            raise UsageError(
                f"{folder / FUSION_CONFIG}: differs from {folders[0]} in {differ}; the members of an "
                "ensemble must read the same features and predict the same labels"
            )
    return Ensemble(folders, list(models), records[0], home)


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
    return write_ensemble_record(folder, [Path(checkpoint) for checkpoint in checkpoints])
