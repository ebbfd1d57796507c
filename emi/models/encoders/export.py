"""A Stage I export: `{vision,text,audio}/` from_pretrained folders (each with its tokenizer, image processing or
feature extractor), `projection.safetensors` (the projection heads and logit scales) and `archs.json`; and loading
one back as frozen encoders for feature extraction."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from emi.errors import UsageError
from emi.models.encoders.build import MODALITY_ARCHS, MODEL_TYPE_ARCH, build_encoder, build_tokenizer
from emi.models.encoders.contrastive import ContrastiveModel
from emi.models.encoders.preprocessing import PREPROCESSOR_FILE, audio_extractor, image_processing, preprocessor_config

PROJECTION_FILE = "projection.safetensors"
ARCHS_FILE = "archs.json"  # in an export folder: {"vision": arch, "text": arch, "audio": arch}


def _sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def export_encoders(
    model: ContrastiveModel,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write out_dir/{vision,text,audio}/ (from_pretrained folders) and out_dir/projection.safetensors.

    The weights come from `state_dict`, the FULL state dict of `model` (under ZeRO-3 the parameters of `model`
    itself are partitioned, so the engine gathers it first); `model` only supplies the architectures. Call it on
    one rank. Without a tokenizer the text spec's tokenizer is saved.
    """
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(
            f"state dict is not a full ContrastiveModel state dict: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} keys)"
        )
    out_dir = Path(out_dir)
    specs = {"vision": model.vision_spec, "text": model.text_spec, "audio": model.audio_spec}
    archs = {}
    for name in ("vision", "text", "audio"):
        encoder = getattr(model, name)
        if encoder is not None:
            encoder.save_pretrained(out_dir / name, state_dict=_sub_state_dict(state_dict, f"{name}."))
            archs[name] = specs[name]["arch"]
    (tokenizer or build_tokenizer(model.text_spec)).save_pretrained(out_dir / "text")
    if model.vision is not None:
        info = image_processing(model.vision_spec)
        preprocessor = preprocessor_config(model.vision_spec["arch"], info)
        (out_dir / "vision" / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n")
    if model.audio is not None:
        model.audio_extractor.save_pretrained(out_dir / "audio")
    (out_dir / ARCHS_FILE).write_text(json.dumps(archs, indent=1) + "\n")
    heads = {
        key: state_dict[key].detach().cpu().clone().contiguous()
        for key in sorted(expected)
        if key.endswith("_projection.weight") or key.startswith("logit_scale_")
    }
    save_file(
        heads, str(out_dir / PROJECTION_FILE), metadata={"max_logit_scale": str(math.exp(model.max_log_logit_scale))}
    )
    return out_dir


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error})") from error


def load_encoders(export_dir: str | Path) -> dict[str, Any]:
    """Frozen eval-mode encoders of an export folder for feature extraction, each built with the arch the export
    records in archs.json (older exports: the arch of its model_type).

    Returns {"vision", "text", "audio": encoder or None (not trained), "tokenizer",
    "image_processing": dict or None, "audio_extractor": feature extractor or None}.
    """
    export_dir = Path(export_dir)
    if not (export_dir / "text" / "config.json").is_file():
        raise UsageError(f"{export_dir}: not an encoder export folder (no text/config.json)")
    archs_path = export_dir / ARCHS_FILE
    archs = _read_json(archs_path) if archs_path.is_file() else {}
    if not isinstance(archs, dict):
        raise UsageError(f"{archs_path}: not a JSON object of modality -> arch")
    loaded: dict[str, Any] = {
        "vision": None,
        "text": None,
        "audio": None,
        "image_processing": None,
        "audio_extractor": None,
    }
    for name in ("vision", "text", "audio"):
        config_path = export_dir / name / "config.json"
        if not config_path.is_file():
            continue
        model_type = _read_json(config_path).get("model_type")
        arch = archs.get(name, MODEL_TYPE_ARCH.get(model_type))
        if arch not in MODALITY_ARCHS[name]:
            raise UsageError(
                f"{config_path}: model_type {model_type!r} (arch {arch!r}) is not a {name} encoder "
                f"(expected one of the archs {MODALITY_ARCHS[name]})"
            )
        spec = {"arch": arch, "pretrained": str(export_dir / name), "config": None}
        encoder = build_encoder(spec, name).eval()
        encoder.requires_grad_(False)
        loaded[name] = encoder
        if name == "vision":
            loaded["image_processing"] = image_processing(spec)
        if name == "audio":
            loaded["audio_extractor"] = audio_extractor(spec)
    text_spec = {"arch": archs.get("text", "bert"), "pretrained": str(export_dir / "text"), "config": None}
    loaded["tokenizer"] = build_tokenizer(text_spec)
    return loaded
