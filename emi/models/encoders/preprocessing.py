"""What each encoder takes in: a vision encoder's input size and normalisation (from its config or its
preprocessor_config.json), an audio encoder's feature extractor (sampling rate, normalisation, Whisper's log-mel),
and the waveform preparation both the features and training apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.utils import cached_file
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from emi.errors import UsageError
from emi.models.encoders.build import ARCHS, ENCODER_TOWERS, check_spec, checked_auto_config, load_pretrained

PREPROCESSOR_FILE = "preprocessor_config.json"


def _read_preprocessor(name: str, modality: str) -> dict[str, Any] | None:
    """The preprocessor_config.json of a pretrained folder or cached name; None when it has none."""
    try:
        path = cached_file(name, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    except OSError as error:
        raise UsageError(f"cannot read {PREPROCESSOR_FILE} of {modality} encoder {name!r}: {error}") from error
    if path is None:
        return None
    try:
        processor = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(processor, dict):
        raise UsageError(f"{path}: not a JSON object")
    return processor


def _processor_size(processor: dict[str, Any]) -> int | None:
    """The square input side an image processor feeds its model: the centre crop, else the resize target."""
    for key in (("crop_size",) if processor.get("do_center_crop") else ()) + ("size",):
        size = processor.get(key)
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
            if side:
                return int(side)
    return None


def image_processing(spec: dict[str, Any]) -> dict[str, Any]:
    """Input size and normalisation of a vision encoder: {"image_size", "image_mean", "image_std"}.

    clip/vit: the config's image_size; auto: the processor's crop or resize size where it has one (DINOv2
    checkpoints say 518 in the config, for their position embeddings, and 224 in the processor)."""
    arch, name, config_kwargs = check_spec(spec, "vision")
    if arch == "auto":
        config, _ = checked_auto_config(name, config_kwargs, "vision")
    elif name is None:
        config = ARCHS[arch][0](**config_kwargs)
    else:
        config = load_pretrained(ARCHS[arch][0], name)
    size, mean, std = int(config.image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if name is not None:
        processor = _read_preprocessor(name, "vision")
        if processor is None or "image_mean" not in processor or "image_std" not in processor:
            raise UsageError(f"vision encoder {name!r}: no {PREPROCESSOR_FILE} with image_mean/image_std")
        mean, std = processor["image_mean"], processor["image_std"]
        if arch == "auto":
            size = _processor_size(processor) or size
    return {"image_size": size, "image_mean": [float(m) for m in mean], "image_std": [float(s) for s in std]}


def audio_extractor(spec: dict[str, Any]) -> FeatureExtractionMixin:
    """The feature extractor that says what an audio encoder hears: its sampling rate, whether waveforms are
    normalised, and for Whisper the log-mel spectrogram. A pretrained auto folder's own, else the family's default
    (Wav2Vec2's: 16 kHz, normalised; Whisper's with the config's number of mel bins)."""
    arch, name, config_kwargs = check_spec(spec, "audio")
    if arch == "auto":
        config, _ = checked_auto_config(name, config_kwargs, "audio")
        if name is not None and _read_preprocessor(name, "audio") is not None:
            return load_pretrained(AutoFeatureExtractor, name)
        if config.model_type in ENCODER_TOWERS:
            return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return Wav2Vec2FeatureExtractor(do_normalize=True)


def preprocessor_config(arch: str, info: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor_config.json equivalent to `info`, in the format of the original checkpoints."""
    size = info["image_size"]
    common = {
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": info["image_mean"],
        "image_std": info["image_std"],
    }
    if arch == "clip":
        return {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_convert_rgb": True,
            **common,
        }
    return {
        "image_processor_type": "ViTImageProcessor",
        "size": {"height": size, "width": size},
        "resample": 2,
        **common,
    }


WAV2VEC2_INPUT = Wav2Vec2FeatureExtractor(do_normalize=True)  # what the wav2vec2 arch hears: 16 kHz, normalised


def normalise_waveform(input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each waveform's valid samples, padding zeroed: the input convention of
    Wav2Vec2 checkpoints (their feature extractor's do_normalize), applied here so every caller gets it."""
    mask = attention_mask.to(input_values.dtype)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (input_values * mask).sum(-1, keepdim=True) / count
    var = (((input_values - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (input_values - mean) / torch.sqrt(var + 1e-7) * mask


def prepare_waveform(
    input_values: torch.Tensor, attention_mask: torch.Tensor, extractor: FeatureExtractionMixin = WAV2VEC2_INPUT
) -> torch.Tensor:
    """Waveforms as the encoder's feature extractor gives them: normalised when it normalises, padding zeroed."""
    if getattr(extractor, "do_normalize", False):
        return normalise_waveform(input_values, attention_mask)
    return input_values * attention_mask.to(input_values.dtype)


def log_mel(waveforms: torch.Tensor, extractor: WhisperFeatureExtractor) -> torch.Tensor:
    """Whisper's log-mel input features [N, mel, S / hop] of waveforms [N, S], on their device: what
    WhisperFeatureExtractor computes (its torch path), each spectrogram clamped 8 decades below its maximum."""
    window = torch.hann_window(extractor.n_fft, device=waveforms.device)
    with torch.autocast(waveforms.device.type, enabled=False):  # float32 even in bf16 runs: logs of small powers
        stft = torch.stft(waveforms.float(), extractor.n_fft, extractor.hop_length, window=window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = torch.from_numpy(extractor.mel_filters).to(power).T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0
