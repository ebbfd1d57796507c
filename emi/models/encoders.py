"""Stage I: the three modality encoders, the contrastive model that aligns vision and audio with text, export.

An encoder spec is the plain dict of the YAML config: {"arch": "clip"|"vit"|"bert"|"wav2vec2"|"auto",
"pretrained": NAME_OR_PATH or null, "config": {kwargs of the transformers config} or null}, at least one of
pretrained/config (config next to pretrained overrides fields). Nothing is ever downloaded here on purpose: run
with HF_HUB_OFFLINE=1 and a pretrained name resolves to a local folder or the local Hugging Face cache.

arch "auto" takes any transformers model of the modality through the Auto classes (DINOv2, SigLIP, HuBERT, WavLM,
Whisper's encoder, RoBERTa, DistilBERT, ...): from a pretrained folder, or from a config with a `model_type`. Its
tokenizer (AutoTokenizer), image size and normalisation (preprocessor_config.json) and audio input (the feature
extractor: sampling rate, normalisation, Whisper's log-mel spectrogram) come with it; AUTO_POOLING says how each
family's states become one feature.

Features (paper Sec. 3.1): vision = pooled CLS token per frame, text = BERT states mean-pooled over the attention
mask, audio = Wav2Vec2 states (20 ms frames) mean-pooled over valid frames, or kept per frame for Stage II and
averaged into each video frame's time window by `pool_audio_to_frames`.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoFeatureExtractor,
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
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperFeatureExtractor,
)
from transformers.feature_extraction_utils import FeatureExtractionMixin
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import cached_file, logging as transformers_logging
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from emi.errors import UsageError

transformers_logging.disable_progress_bar()  # a "Loading weights" bar per encoder and rank drowns the logs

VOCAB_FILE = Path(__file__).parent / "assets" / "vocab.txt"
MODALITY_ARCHS = {"vision": ("clip", "vit", "auto"), "text": ("bert", "auto"), "audio": ("wav2vec2", "auto")}
ARCHS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "vit": (ViTConfig, ViTModel),
    "bert": (BertConfig, BertModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
}
# config.json model_type of an exported folder -> arch, for exports older than ARCHS_FILE
MODEL_TYPE_ARCH = {"clip_vision_model": "clip", "vit": "vit", "bert": "bert", "wav2vec2": "wav2vec2"}
PROJECTION_FILE = "projection.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
ARCHS_FILE = "archs.json"  # in an export folder: {"vision": arch, "text": arch, "audio": arch}

# How each family's states become one feature, whatever the arch (vision_features, text_features, audio_features).
#   cls:    the first token of the last hidden states (after the final norm)
#   pooler: the model's own pooler_output (CLIP: post-norm CLS; SigLIP: its attention-pooling head)
#   mean:   the mean over valid positions: text tokens under the attention mask, audio frames whose receptive
#           field lies in the valid samples (as the paper pools BERT and Wav2Vec2)
# Only vision families differ: every text and audio family is mean-pooled (listed for the record). A vision family
# not listed takes its pooler_output where the model gives one, else cls.
AUTO_POOLING = {
    "vit": "cls", "deit": "cls", "dinov2": "cls", "dinov2_with_registers": "cls",
    "clip_vision_model": "pooler", "siglip_vision_model": "pooler",
    "wav2vec2": "mean", "hubert": "mean", "wavlm": "mean", "data2vec-audio": "mean", "whisper": "mean",
    "bert": "mean", "roberta": "mean", "xlm-roberta": "mean", "electra": "mean", "distilbert": "mean",
    "modernbert": "mean", "mpnet": "mean",
}
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
        raise UsageError(f"an arch: auto encoder built from 'config' needs its model_type (e.g. dinov2, hubert, "
                         f"roberta), got keys {sorted(config)}")
    if modality == "text":
        vocab_size = len(bundled_vocab())
        config = {"vocab_size": vocab_size, **config}
        if config["vocab_size"] < vocab_size:
            raise UsageError(f"text encoder vocab_size {config['vocab_size']} is smaller than the bundled vocab "
                             f"{VOCAB_FILE} ({vocab_size} tokens)")
        if arch == "auto":  # the bundled tokenizer pads with 0; RoBERTa-like position ids count non-pad tokens
            config = {"pad_token_id": bundled_vocab()["[PAD]"], **config}
    if arch == "auto":
        config = dict(config)
        try:
            return AutoConfig.for_model(config.pop("model_type"), **config)
        except ValueError as error:
            raise UsageError(f"arch: auto config: {error}") from error
    return ARCHS[arch][0](**config)


def _load_pretrained(model_class, name: str, **kwargs):
    try:
        return model_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load pretrained {name!r} (nothing is downloaded: give a local folder or a "
                         f"name in the local Hugging Face cache): {error}") from error


def _auto_config(name: str | None, overrides: dict[str, Any] | None, modality: str):
    """The config of an arch: auto encoder: the modality's tower of a multi-tower folder (CLIP, SigLIP), with
    the spec's overrides applied."""
    if name is None:
        config = _tiny_config("auto", overrides, modality)
    else:
        config = _load_pretrained(AutoConfig, name)
        config = getattr(config, f"{modality}_config", None) or config
        config.update(overrides or {})
    return config


def _auto_model_class(config, modality: str, source: str):
    """The base model class of `config`, refused unless it takes the modality's input."""
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None:
        raise UsageError(f"{source}: transformers has no base model for model_type {config.model_type!r}")
    takes = model_class.main_input_name
    if takes not in MODALITY_INPUTS[modality]:
        kind = next((m for m, inputs in MODALITY_INPUTS.items() if takes in inputs), "something else")
        raise UsageError(f"{source}: {model_class.__name__} (model_type {config.model_type!r}) is a model of {kind} "
                         f"(it takes {takes}), not of {modality}: it cannot be the {modality} encoder")
    if config.is_encoder_decoder and config.model_type not in ENCODER_TOWERS:
        raise UsageError(f"{source}: {model_class.__name__} is an encoder-decoder whose encoder emi cannot take "
                         f"alone (it can: {sorted(ENCODER_TOWERS)})")
    if modality == "audio" and config.model_type not in ENCODER_TOWERS and not hasattr(config, "conv_stride"):
        raise UsageError(f"{source}: {model_class.__name__} has neither a convolutional waveform encoder "
                         "(Wav2Vec2, HuBERT, WavLM) nor Whisper's log-mel input: emi cannot tell its frame rate")
    return model_class


def _checked_auto_config(name: str | None, overrides: dict[str, Any] | None, modality: str):
    """(config, base model class) of an arch: auto encoder, refused unless it is a model of `modality`: every
    slot's first check, before its tokenizer, image processing or feature extractor is read."""
    config = _auto_config(name, overrides, modality)
    return config, _auto_model_class(config, modality, name or f"{modality} encoder config")


def _build_auto(name: str | None, overrides: dict[str, Any] | None, modality: str) -> PreTrainedModel:
    config, model_class = _checked_auto_config(name, overrides, modality)
    kwargs = {"add_pooling_layer": False} if config.model_type in WITHOUT_POOLER else {}
    tower = ENCODER_TOWERS.get(config.model_type)
    if name is None:
        model = (tower or model_class)(config, **kwargs)
    elif tower is not None and config.architectures == [tower.__name__]:  # an export: the tower alone
        model = _load_pretrained(tower, name, config=config)
    else:
        model = _load_pretrained(model_class, name, config=config, **kwargs)
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
        return _load_pretrained(model_class, pretrained, **kwargs, **(config or {}))
    return model_class(_tiny_config(arch, config, modality), **kwargs)


def build_tokenizer(spec: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The text encoder's tokenizer (auto: AutoTokenizer's); a tiny config gets a WordPiece tokenizer over the
    bundled vocab."""
    arch, pretrained, config = check_spec(spec, "text")
    if arch == "auto":
        _checked_auto_config(pretrained, config, "text")
    if pretrained is not None:
        return _load_pretrained(AutoTokenizer if arch == "auto" else BertTokenizerFast, pretrained)
    max_length = _tiny_config(arch, config, "text").max_position_embeddings
    return BertTokenizerFast(vocab=bundled_vocab(), model_max_length=max_length)


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
        config, _ = _checked_auto_config(name, config_kwargs, "vision")
    elif name is None:
        config = ARCHS[arch][0](**config_kwargs)
    else:
        config = _load_pretrained(ARCHS[arch][0], name)
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
        config, _ = _checked_auto_config(name, config_kwargs, "audio")
        if name is not None and _read_preprocessor(name, "audio") is not None:
            return _load_pretrained(AutoFeatureExtractor, name)
        if config.model_type in ENCODER_TOWERS:
            return WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return Wav2Vec2FeatureExtractor(do_normalize=True)


def _preprocessor_config(arch: str, info: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor_config.json equivalent to `info`, in the format of the original checkpoints."""
    size = info["image_size"]
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": info["image_mean"], "image_std": info["image_std"]}
    if arch == "clip":
        return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size}, "resample": 3,
                "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_convert_rgb": True,
                **common}
    return {"image_processor_type": "ViTImageProcessor", "size": {"height": size, "width": size}, "resample": 2,
            **common}


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of states [N, L, D] over the positions where mask [N, L] is true; all-false rows give zeros."""
    mask = mask.to(states.dtype).unsqueeze(-1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


def vision_features(encoder: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pooled feature [N, Dv] of images [N, 3, H, W], as AUTO_POOLING says for the encoder's family."""
    outputs = encoder(pixel_values=pixel_values)
    pooling = AUTO_POOLING.get(encoder.config.model_type)
    if pooling == "pooler" or (pooling is None and getattr(outputs, "pooler_output", None) is not None):
        return outputs.pooler_output
    return outputs.last_hidden_state[:, 0]


def text_features(encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence feature [N, Dt]: token states mean-pooled over the attention mask."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return masked_mean(states, attention_mask.bool())


WAV2VEC2_INPUT = Wav2Vec2FeatureExtractor(do_normalize=True)  # what the wav2vec2 arch hears: 16 kHz, normalised


def normalise_waveform(input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each waveform's valid samples, padding zeroed: the input convention of
    Wav2Vec2 checkpoints (their feature extractor's do_normalize), applied here so every caller gets it."""
    mask = attention_mask.to(input_values.dtype)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (input_values * mask).sum(-1, keepdim=True) / count
    var = (((input_values - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (input_values - mean) / torch.sqrt(var + 1e-7) * mask


def prepare_waveform(input_values: torch.Tensor, attention_mask: torch.Tensor,
                     extractor: FeatureExtractionMixin = WAV2VEC2_INPUT) -> torch.Tensor:
    """Waveforms as the encoder's feature extractor gives them: normalised when it normalises, padding zeroed."""
    if getattr(extractor, "do_normalize", False):
        return normalise_waveform(input_values, attention_mask)
    return input_values * attention_mask.to(input_values.dtype)


def audio_frame_grid(encoder: PreTrainedModel, extractor: FeatureExtractionMixin = WAV2VEC2_INPUT
                     ) -> tuple[int, int, int | None]:
    """(samples one frame sees, samples between frames, most frames per call or None) of an audio encoder.

    Convolutional waveform encoders (Wav2Vec2, HuBERT, WavLM): the receptive field and stride of the convolutions,
    (400, 320) at 16 kHz, any length. Whisper: frames two mel hops apart (320 samples) over a fixed window of
    max_source_positions frames (30 s); a frame counts as seeing its own stride."""
    if encoder.main_input_name == "input_features":
        stride = extractor.hop_length * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        return stride, stride, encoder.config.max_source_positions
    field, stride = 1, 1
    for kernel, step in zip(encoder.config.conv_kernel, encoder.config.conv_stride):
        field += (kernel - 1) * stride
        stride *= step
    return field, stride, None


def log_mel(waveforms: torch.Tensor, extractor: WhisperFeatureExtractor) -> torch.Tensor:
    """Whisper's log-mel input features [N, mel, S / hop] of waveforms [N, S], on their device: what
    WhisperFeatureExtractor computes (its torch path), each spectrogram clamped 8 decades below its maximum."""
    window = torch.hann_window(extractor.n_fft, device=waveforms.device)
    with torch.autocast(waveforms.device.type, enabled=False):  # float32 even in bf16 runs: logs of small powers
        stft = torch.stft(waveforms.float(), extractor.n_fft, extractor.hop_length, window=window,
                          return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = torch.from_numpy(extractor.mel_filters).to(power).T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def audio_frame_features(
    encoder: PreTrainedModel, input_values: torch.Tensor, attention_mask: torch.Tensor,
    extractor: FeatureExtractionMixin = WAV2VEC2_INPUT, prepare: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame features [N, F, Da] (one per 20 ms) and the valid-frame mask [N, F] of waveforms [N, S].

    Waveforms are prepared as `extractor` says (`prepare_waveform`: normalised or not, padding zeroed);
    prepare=False: the caller did it already (emi.features runs a long clip's waveform through in windows).
    Convolutional encoders: a frame is valid when its whole receptive field lies in the valid samples; S must be
    at least one receptive field (400 samples at 16 kHz). Checkpoints with a group-norm feature extractor
    (feat_extract_norm="group", e.g. wav2vec2-base, wav2vec2-large-960h, hubert-base) were trained without
    attention masks, so, as the transformers Wav2Vec2 docs advise, they get zero padding and no mask; they
    normalise over the padded length, so their features depend slightly on padding. Layer-norm ones (e.g.
    -large-960h-lv60-self) do not. Whisper: the waveform is zero-padded to its fixed window (S at most one
    window), so padding never changes a feature; a frame is valid when its 320 samples are.
    """
    if prepare:
        input_values = prepare_waveform(input_values, attention_mask, extractor)
    lengths = attention_mask.sum(-1)
    if encoder.main_input_name == "input_features":
        _, stride, max_frames = audio_frame_grid(encoder, extractor)
        window = stride * max_frames
        if input_values.shape[1] > window:
            raise ValueError(f"{input_values.shape[1]} samples are more than the {window} of one Whisper window")
        padded = F.pad(input_values, (0, window - input_values.shape[1]))
        states = encoder(log_mel(padded, extractor).to(input_values.dtype)).last_hidden_state
        lengths = lengths // stride
    else:
        uses_mask = getattr(encoder.config, "feat_extract_norm", "layer") == "layer"  # Data2VecAudio: always
        states = encoder(input_values, attention_mask=attention_mask if uses_mask else None).last_hidden_state
        lengths = encoder._get_feat_extract_output_lengths(lengths)
    frame_mask = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
    return states, frame_mask


def audio_features(encoder: PreTrainedModel, input_values: torch.Tensor, attention_mask: torch.Tensor,
                   extractor: FeatureExtractionMixin = WAV2VEC2_INPUT) -> torch.Tensor:
    """Clip feature [N, Da]: frame features mean-pooled over valid frames (zeros when no frame is valid)."""
    states, frame_mask = audio_frame_features(encoder, input_values, attention_mask, extractor)
    return masked_mean(states, frame_mask)


def pool_audio_to_frames(
    audio_feats: torch.Tensor,
    frame_mask: torch.Tensor,
    num_video_frames: int,
    video_fps: float = 5.0,
    audio_frame_s: float = 0.02,
) -> torch.Tensor:
    """Average the valid audio frames [F, Da] that start in each video frame's window [t/fps, (t+1)/fps): [T, Da].

    Audio frame f starts at f * audio_frame_s. A window without a valid audio frame (audio shorter than the video)
    takes the valid frame nearest to its centre; with no valid audio frame at all the result is zeros and the caller
    marks the audio missing. Audio past the last video frame is dropped.
    """
    if audio_feats.dim() != 2 or frame_mask.shape != audio_feats.shape[:1]:
        raise ValueError(f"expected audio_feats [F, D] and frame_mask [F], got {tuple(audio_feats.shape)} "
                         f"and {tuple(frame_mask.shape)}")
    pooled = audio_feats.new_zeros(num_video_frames, audio_feats.shape[1])
    valid = torch.nonzero(frame_mask.bool()).squeeze(1)
    if valid.numel() == 0 or num_video_frames == 0:
        return pooled
    starts = valid.to(torch.float64) * audio_frame_s
    # The small epsilon keeps exact boundaries (10 * 0.02 * 5 = 1.0000000000000002 or 0.9999999999999999) stable.
    window = torch.floor(starts * video_fps + 1e-6).long()
    inside = window < num_video_frames
    counts = torch.zeros(num_video_frames, dtype=audio_feats.dtype, device=audio_feats.device)
    counts.index_add_(0, window[inside], torch.ones_like(window[inside], dtype=audio_feats.dtype))
    pooled.index_add_(0, window[inside], audio_feats[valid[inside]])
    pooled = pooled / counts.clamp(min=1).unsqueeze(1)
    empty = torch.nonzero(counts == 0).squeeze(1)
    if empty.numel():
        window_centres = (empty.to(torch.float64) + 0.5) / video_fps
        frame_centres = starts + audio_frame_s / 2
        nearest = (window_centres[:, None] - frame_centres[None, :]).abs().argmin(1)
        pooled[empty] = audio_feats[valid[nearest]]
    return pooled


class ContrastiveModel(nn.Module):
    """CLIP-style vision-text and CLAP-style audio-text alignment around one shared text encoder (paper Sec. 3.3).

    Each present encoder gets a bias-free linear head into one embed_dim space, and each trained pair its own
    learnable logit scale (init log(1/init_temperature), clamped to log(max_logit_scale) in forward, as CLIP).
    """

    def __init__(
        self,
        vision_spec: dict[str, Any] | None,
        text_spec: dict[str, Any],
        audio_spec: dict[str, Any] | None,
        embed_dim: int,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if vision_spec is None and audio_spec is None:
            raise UsageError("the contrastive model needs a vision or an audio encoder to align with text")
        # Plain dicts, not state: export rebuilds the tokenizer and the image processing info from them.
        self.vision_spec, self.text_spec, self.audio_spec = vision_spec, text_spec, audio_spec
        self.audio_extractor = audio_extractor(audio_spec) if audio_spec is not None else None
        self.max_log_logit_scale = math.log(max_logit_scale)
        # Shape [1], not a scalar: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        init_logit_scale = torch.tensor([math.log(1 / init_temperature)])

        self.text = build_encoder(text_spec, "text")
        self.text_projection = nn.Linear(self.text.config.hidden_size, embed_dim, bias=False)
        self.vision = build_encoder(vision_spec, "vision") if vision_spec is not None else None
        self.audio = build_encoder(audio_spec, "audio") if audio_spec is not None else None
        if self.vision is not None:
            self.vision_projection = nn.Linear(self.vision.config.hidden_size, embed_dim, bias=False)
            self.logit_scale_vision_text = nn.Parameter(init_logit_scale.clone())
        if self.audio is not None:
            self.audio_projection = nn.Linear(self.audio.config.hidden_size, embed_dim, bias=False)
            self.logit_scale_audio_text = nn.Parameter(init_logit_scale.clone())

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """L2-normalised "image"/"text"/"audio" embeddings of the given inputs, and the pairs' logit scales."""
        out = {}
        if pixel_values is not None:
            if self.vision is None:
                raise ValueError("pixel_values given but the model has no vision encoder")
            out["image"] = F.normalize(self.vision_projection(vision_features(self.vision, pixel_values)), dim=-1)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out["text"] = F.normalize(self.text_projection(text_features(self.text, input_ids, attention_mask)), dim=-1)
        if input_values is not None:
            if self.audio is None:
                raise ValueError("input_values given but the model has no audio encoder")
            if audio_attention_mask is None:
                audio_attention_mask = torch.ones_like(input_values, dtype=torch.long)
            pooled = audio_features(self.audio, input_values, audio_attention_mask, self.audio_extractor)
            out["audio"] = F.normalize(self.audio_projection(pooled), dim=-1)
        if self.vision is not None:
            out["logit_scale_vision_text"] = self.logit_scale_vision_text.clamp(max=self.max_log_logit_scale).exp()[0]
        if self.audio is not None:
            out["logit_scale_audio_text"] = self.logit_scale_audio_text.clamp(max=self.max_log_logit_scale).exp()[0]
        return out


def _sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


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
        raise ValueError(f"state dict is not a full ContrastiveModel state dict: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} keys)")
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
        preprocessor = _preprocessor_config(model.vision_spec["arch"], info)
        (out_dir / "vision" / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n")
    if model.audio is not None:
        model.audio_extractor.save_pretrained(out_dir / "audio")
    (out_dir / ARCHS_FILE).write_text(json.dumps(archs, indent=1) + "\n")
    heads = {key: state_dict[key].detach().cpu().clone().contiguous() for key in sorted(expected)
             if key.endswith("_projection.weight") or key.startswith("logit_scale_")}
    save_file(heads, str(out_dir / PROJECTION_FILE),
              metadata={"max_logit_scale": str(math.exp(model.max_log_logit_scale))})
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
    loaded: dict[str, Any] = {"vision": None, "text": None, "audio": None, "image_processing": None,
                              "audio_extractor": None}
    for name in ("vision", "text", "audio"):
        config_path = export_dir / name / "config.json"
        if not config_path.is_file():
            continue
        model_type = _read_json(config_path).get("model_type")
        arch = archs.get(name, MODEL_TYPE_ARCH.get(model_type))
        if arch not in MODALITY_ARCHS[name]:
            raise UsageError(f"{config_path}: model_type {model_type!r} (arch {arch!r}) is not a {name} encoder "
                             f"(expected one of the archs {MODALITY_ARCHS[name]})")
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
