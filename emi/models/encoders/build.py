"""Building an encoder of a modality from its spec, and its tokenizer.

An encoder spec is the plain dict of the YAML config: {"arch": "clip"|"vit"|"bert"|"wav2vec2"|"auto",
"pretrained": NAME_OR_PATH or null, "config": {kwargs of the transformers config} or null}, at least one of
pretrained/config (config next to pretrained overrides fields). Nothing is ever downloaded here on purpose: run
with HF_HUB_OFFLINE=1 and a pretrained name resolves to a local folder or the local Hugging Face cache.

arch "auto" takes any transformers model of the modality through the Auto classes (DINOv2, SigLIP, HuBERT, WavLM,
Whisper's encoder, RoBERTa, DistilBERT, ...): from a pretrained folder, or from a config with a `model_type`. Every
slot checks first that the model is one of its modality (`checked_auto_config`), before its tokenizer, image
processing or feature extractor (preprocessing.py) is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViTConfig,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as transformers_logging

from emi.errors import UsageError

transformers_logging.disable_progress_bar()  # a "Loading weights" bar per encoder and rank drowns the logs

VOCAB_FILE = Path(__file__).resolve().parents[1] / "assets" / "vocab.txt"
MODALITY_ARCHS = {"vision": ("clip", "vit", "auto"), "text": ("bert", "auto"), "audio": ("wav2vec2", "auto")}


ARCHS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "vit": (ViTConfig, ViTModel),
    "bert": (BertConfig, BertModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
}


# config.json model_type of an exported folder -> arch, for exports older than ARCHS_FILE
MODEL_TYPE_ARCH = {"clip_vision_model": "clip", "vit": "vit", "bert": "bert", "wav2vec2": "wav2vec2"}


# Families whose pooler goes unused (cls or mean pooling): built without it, as parameters without gradients
# upset DDP and ZeRO.
WITHOUT_POOLER = ("vit", "deit", "bert", "roberta", "xlm-roberta")


# Encoder-decoder families: the encoder is the tower; an export holds the tower alone.
ENCODER_TOWERS = {"whisper": WhisperEncoder}


# What an encoder of each modality takes (the model class's main_input_name).
MODALITY_INPUTS = {"vision": ("pixel_values",), "text": ("input_ids",), "audio": ("input_values", "input_features")}


def check_spec(spec: dict[str, Any], modality: str) -> tuple[str, str | None, dict[str, Any] | None]:
    """Validate an encoder spec for `modality`: (arch, pretrained name or None, config kwargs or None)."""
    if not isinstance(spec, dict):
        raise UsageError(f"{modality} encoder spec must be a mapping with arch/pretrained/config, got {spec!r}")
    unknown = set(spec) - {"arch", "pretrained", "config"}
    if unknown:
        raise UsageError(f"{modality} encoder spec has unknown keys {sorted(unknown)}")
    arch = spec.get("arch")
    if arch not in MODALITY_ARCHS[modality]:
        raise UsageError(f"{modality} encoder arch must be one of {MODALITY_ARCHS[modality]}, got {arch!r}")
    pretrained, config = spec.get("pretrained"), spec.get("config")
    if pretrained is None and config is None:
        raise UsageError(f"{modality} encoder spec needs 'pretrained' (with optional 'config' overrides) or 'config'")
    if config is not None and not isinstance(config, dict):
        raise UsageError(f"{modality} encoder 'config' must be a mapping of config kwargs, got {config!r}")
    return arch, None if pretrained is None else str(pretrained), config


def bundled_vocab() -> dict[str, int]:
    tokens = VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    return {token: index for index, token in enumerate(tokens)}


def _tiny_config(arch: str, config: dict[str, Any], modality: str):
    """The transformers config of a random-init encoder; a text encoder's vocabulary is the bundled one's."""
    if arch == "auto" and "model_type" not in config:
        raise UsageError(
            f"an arch: auto encoder built from 'config' needs its model_type (e.g. dinov2, hubert, "
            f"roberta), got keys {sorted(config)}"
        )
    if modality == "text":
        vocab_size = len(bundled_vocab())
        config = {"vocab_size": vocab_size, **config}
        if config["vocab_size"] < vocab_size:
            raise UsageError(
                f"text encoder vocab_size {config['vocab_size']} is smaller than the bundled vocab "
                f"{VOCAB_FILE} ({vocab_size} tokens)"
            )
        if arch == "auto":  # the bundled tokenizer pads with 0; RoBERTa-like position ids count non-pad tokens
            config = {"pad_token_id": bundled_vocab()["[PAD]"], **config}
    if arch == "auto":
        config = dict(config)
        try:
            return AutoConfig.for_model(config.pop("model_type"), **config)
        except ValueError as error:
            raise UsageError(f"arch: auto config: {error}") from error
    return ARCHS[arch][0](**config)


def load_pretrained(model_class, name: str, **kwargs):
    try:
        return model_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot load pretrained {name!r} (nothing is downloaded: give a local folder or a "
            f"name in the local Hugging Face cache): {error}"
        ) from error


def auto_config(name: str | None, overrides: dict[str, Any] | None, modality: str):
    """The config of an arch: auto encoder: the modality's tower of a multi-tower folder (CLIP, SigLIP), with
    the spec's overrides applied."""
    if name is None:
        config = _tiny_config("auto", overrides, modality)
    else:
        config = load_pretrained(AutoConfig, name)
        config = getattr(config, f"{modality}_config", None) or config
        config.update(overrides or {})
    return config


def auto_model_class(config, modality: str, source: str):
    """The base model class of `config`, refused unless it takes the modality's input."""
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None:
        raise UsageError(f"{source}: transformers has no base model for model_type {config.model_type!r}")
    takes = model_class.main_input_name
    if takes not in MODALITY_INPUTS[modality]:
        kind = next((m for m, inputs in MODALITY_INPUTS.items() if takes in inputs), "something else")
        raise UsageError(
            f"{source}: {model_class.__name__} (model_type {config.model_type!r}) is a model of {kind} "
            f"(it takes {takes}), not of {modality}: it cannot be the {modality} encoder"
        )
    if config.is_encoder_decoder and config.model_type not in ENCODER_TOWERS:
        raise UsageError(
            f"{source}: {model_class.__name__} is an encoder-decoder whose encoder emi cannot take "
            f"alone (it can: {sorted(ENCODER_TOWERS)})"
        )
    if modality == "audio" and config.model_type not in ENCODER_TOWERS and not hasattr(config, "conv_stride"):
        raise UsageError(
            f"{source}: {model_class.__name__} has neither a convolutional waveform encoder "
            "(Wav2Vec2, HuBERT, WavLM) nor Whisper's log-mel input: emi cannot tell its frame rate"
        )
    return model_class


def checked_auto_config(name: str | None, overrides: dict[str, Any] | None, modality: str):
    """(config, base model class) of an arch: auto encoder, refused unless it is a model of `modality`: every
    slot's first check, before its tokenizer, image processing or feature extractor is read."""
    config = auto_config(name, overrides, modality)
    return config, auto_model_class(config, modality, name or f"{modality} encoder config")


def _build_auto(name: str | None, overrides: dict[str, Any] | None, modality: str) -> PreTrainedModel:
    config, model_class = checked_auto_config(name, overrides, modality)
    kwargs = {"add_pooling_layer": False} if config.model_type in WITHOUT_POOLER else {}
    tower = ENCODER_TOWERS.get(config.model_type)
    if name is None:
        model = (tower or model_class)(config, **kwargs)
    elif tower is not None and config.architectures == [tower.__name__]:  # an export: the tower alone
        model = load_pretrained(tower, name, config=config)
    else:
        model = load_pretrained(model_class, name, config=config, **kwargs)
        model = model.get_encoder() if tower is not None else model
    for parameter_name, parameter in model.named_parameters():
        if parameter_name.endswith("mask_token"):  # for masked-image pretraining: never used here, no gradient
            parameter.requires_grad_(False)
    return model


def build_encoder(spec: dict[str, Any], modality: str) -> PreTrainedModel:
    """A transformers encoder from a spec: pretrained weights, or random init from a (tiny) config."""
    arch, pretrained, config = check_spec(spec, modality)
    if arch == "auto":
        return _build_auto(pretrained, config, modality)
    model_class = ARCHS[arch][1]
    # Poolers we never use would be parameters without gradients (DDP and ZeRO complain).
    kwargs = {"add_pooling_layer": False} if arch in ("vit", "bert") else {}
    if pretrained is not None:
        # 'config' next to 'pretrained' overrides config fields, e.g. {layerdrop: 0.0, mask_time_prob: 0.0}
        return load_pretrained(model_class, pretrained, **kwargs, **(config or {}))
    return model_class(_tiny_config(arch, config, modality), **kwargs)


def build_tokenizer(spec: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The text encoder's tokenizer (auto: AutoTokenizer's); a tiny config gets a WordPiece tokenizer over the
    bundled vocab."""
    arch, pretrained, config = check_spec(spec, "text")
    if arch == "auto":
        checked_auto_config(pretrained, config, "text")
    if pretrained is not None:
        return load_pretrained(AutoTokenizer if arch == "auto" else BertTokenizerFast, pretrained)
    max_length = _tiny_config(arch, config, "text").max_position_embeddings
    return BertTokenizerFast(vocab=bundled_vocab(), model_max_length=max_length)
