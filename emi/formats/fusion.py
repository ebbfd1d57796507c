"""A Stage II checkpoint's record: `config.json` in the checkpoint folder (`<run>/best/`, `<run>/export/`).

    {"format": "emi-fusion/3",
     "model": {"vision_dim", "audio_dim", "text_dim", "num_outputs", and the model section of the Stage II config},
     "labels": [the predicted intensities, in order],
     "encoders": {"source": the export the features came from, "sha256": one digest of its files,
                  "files": {relative path: {"bytes", "sha256"}}: the copy in encoders/ is checked against it},
     "preprocessing": how raw clips were prepared (emi.formats.manifest.Preprocessing),
     "num_frames": frames per clip the model saw (0: all)}

beside `model.safetensors` and `encoders/`. Format 2 (before the fusions became modules of their own) has the same
record and other names for some weights: emi.models.fusion_checkpoint renames them on loading.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from emi.config import FusionSection
from emi.errors import UsageError
from emi.formats.manifest import Preprocessing
from emi.io import is_file_record, records_digest, write_json_atomic

FUSION_FORMAT = "emi-fusion/3"
FUSION_FORMATS = ("emi-fusion/2", FUSION_FORMAT)  # what load_fusion reads
FUSION_CONFIG, FUSION_WEIGHTS, FUSION_ENCODERS = "config.json", "model.safetensors", "encoders"


@dataclass(frozen=True)
class FusionSpec:
    """Everything the fusion model is built from: its inputs' widths, its outputs and the config's model section."""

    vision_dim: int = 1024  # defaults: CLIP ViT-L/14 pooler, Wav2Vec2-large, BERT-base
    audio_dim: int = 1024
    text_dim: int = 768
    num_outputs: int = 6
    options: FusionSection = field(default_factory=FusionSection)

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping config.json keeps: the widths and outputs, then the model section's keys."""
        return {
            "vision_dim": self.vision_dim,
            "audio_dim": self.audio_dim,
            "text_dim": self.text_dim,
            "num_outputs": self.num_outputs,
            **asdict(self.options),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> FusionSpec:
        """The spec of a config.json's "model"; keys of the model section it lacks take their defaults (written
        before they existed); a key this code does not know is a UsageError naming `where`."""
        dims = {"vision_dim", "audio_dim", "text_dim", "num_outputs"}
        known = dims | {f.name for f in fields(FusionSection)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{where}: model arguments this emi does not know: {unknown}")
        options = FusionSection(**{name: value for name, value in values.items() if name not in dims})
        return cls(**{name: values[name] for name in dims if name in values}, options=options)

    @property
    def dims(self) -> dict[str, int]:
        return {"vision": self.vision_dim, "audio": self.audio_dim, "text": self.text_dim}


@dataclass(frozen=True)
class EncodersRecord:
    """The Stage I encoders a checkpoint's features came from: where they were, and every file's size and sha256."""

    source: str
    files: dict[str, dict[str, Any]]  # relative path -> emi.io.file_record

    @property
    def sha256(self) -> str:
        return records_digest(self.files)


@dataclass(frozen=True)
class FusionRecord:
    spec: FusionSpec
    labels: list[str]
    encoders: EncodersRecord
    preprocessing: Preprocessing
    num_frames: int
    format: str = FUSION_FORMAT

    def write(self, folder: Path) -> None:
        write_json_atomic(
            folder / FUSION_CONFIG,
            {
                "format": FUSION_FORMAT,
                "model": self.spec.to_dict(),
                "labels": list(self.labels),
                "encoders": {
                    "source": self.encoders.source,
                    "sha256": self.encoders.sha256,
                    "files": self.encoders.files,
                },
                "preprocessing": self.preprocessing.to_dict(),
                "num_frames": self.num_frames,
            },
        )


def read_fusion_record(folder: Path) -> FusionRecord:
    """The record of a Stage II checkpoint folder; UsageError naming the file and what is wrong with it."""
    path = Path(folder) / FUSION_CONFIG
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{folder}: not a fusion checkpoint ({err})") from None
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    if found not in FUSION_FORMATS:
        raise UsageError(f"{path}: format {found!r}, expected one of {list(FUSION_FORMATS)}")
    missing = [key for key in ("model", "labels", "encoders", "preprocessing", "num_frames") if key not in document]
    if missing:
        raise UsageError(f"{path}: missing {missing}")
    encoders = document["encoders"]
    files = encoders.get("files") if isinstance(encoders, dict) else None
    if not isinstance(files, dict) or not files or not all(map(is_file_record, files.values())):
        raise UsageError(f"{path}: 'encoders' records no encoder files")
    try:
        return FusionRecord(
            spec=FusionSpec.from_dict(document["model"], str(path)),
            labels=list(document["labels"]),
            encoders=EncodersRecord(str(encoders.get("source")), files),
            preprocessing=Preprocessing.from_dict(document["preprocessing"]),
            num_frames=int(document["num_frames"]),
            format=found,
        )
    except (TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"{path}: not a usable fusion record ({type(err).__name__}: {err})") from None
