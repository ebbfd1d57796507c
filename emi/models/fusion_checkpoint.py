"""A Stage II checkpoint folder, self-contained: `model.safetensors`, `config.json` (its record:
emi.formats.fusion) and `encoders/`, the Stage I encoders the features came from (hard links to the export's files
where the file system allows, copies otherwise), checked against the record before they are used again."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emi.errors import UsageError
from emi.formats.fusion import FUSION_ENCODERS, FUSION_WEIGHTS, FusionRecord, read_fusion_record
from emi.io import folder_problems, link_or_copy_folder
from emi.models.fusion import FusionModel

# Weights of format 2, before the fusions were modules of their own: the fusion-specific ones, renamed on loading.
FORMAT_2_FUSION_WEIGHTS = (
    "quality.",
    "modality_embedding",
    "stand_ins",
    "query_norm.",
    "key_norms.",
    "cross_attention.",
    "empty_token",
    "experts.",
)


def save_fusion(folder: Path, state_dict: dict[str, torch.Tensor], record: FusionRecord, encoders: Path) -> None:
    """Write a checkpoint of these weights into `folder`: the weights, the encoders in `encoders` (which must still
    be the files the record lists: a change since training started is caught here), then the record."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / FUSION_WEIGHTS))
    link_or_copy_folder(encoders, folder / FUSION_ENCODERS)
    changed = folder_problems(folder / FUSION_ENCODERS, record.encoders.files)
    if changed:
        raise RuntimeError(f"{encoders}: the encoders changed during training ({'; '.join(changed)})")
    record.write(folder)


def fusion_encoders(folder: str | Path, record: FusionRecord) -> Path:
    """The encoder export folder a checkpoint carries, every file checked against the size and sha256 recorded at
    training time; UsageError naming the files that differ."""
    encoders = Path(folder) / FUSION_ENCODERS
    changed = folder_problems(encoders, record.encoders.files)
    if changed:
        raise UsageError(f"{encoders}: not the encoders this checkpoint was trained with ({'; '.join(changed)})")
    return encoders


def load_fusion(folder: str | Path, device: torch.device | str = "cpu") -> tuple[FusionModel, FusionRecord]:
    """The model of a checkpoint folder in eval mode on `device`, and its record; UsageError naming the folder when
    it is not a usable checkpoint."""
    folder = Path(folder)
    record = read_fusion_record(folder)
    try:
        model = FusionModel(record.spec)
        weights = load_file(str(folder / FUSION_WEIGHTS))
        if record.format == "emi-fusion/2":
            weights = {
                f"fusion.{name}" if name.startswith(FORMAT_2_FUSION_WEIGHTS) else name: tensor
                for name, tensor in weights.items()
            }
        model.load_state_dict(weights)
    except (OSError, SafetensorError, RuntimeError, TypeError, KeyError) as err:
        # missing or damaged weights, weights of another architecture
        raise UsageError(f"{folder}: not a usable fusion checkpoint ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), record
