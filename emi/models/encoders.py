"""Stage I: the three modality encoders, the contrastive model that aligns vision and audio with text, export.

An encoder spec is the plain dict of the YAML config: {"arch": "clip"|"vit"|"bert"|"wav2vec2",
"pretrained": NAME_OR_PATH or null, "config": {kwargs of the transformers config} or null}, exactly one of
pretrained/config. Nothing is ever downloaded here on purpose: run with HF_HUB_OFFLINE=1 and a pretrained name
resolves to a local folder or the local Hugging Face cache.

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
from transformers.utils import cached_file, logging as transformers_logging
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from emi.errors import UsageError

transformers_logging.disable_progress_bar()  # a "Loading weights" bar per encoder and rank drowns the logs

VOCAB_FILE = Path(__file__).parent / "assets" / "vocab.txt"
MODALITY_ARCHS = {"vision": ("clip", "vit"), "text": ("bert",), "audio": ("wav2vec2",)}
ARCHS = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "vit": (ViTConfig, ViTModel),
    "bert": (BertConfig, BertModel),
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
}
# config.json model_type of an exported folder -> arch
MODEL_TYPE_ARCH = {"clip_vision_model": "clip", "vit": "vit", "bert": "bert", "wav2vec2": "wav2vec2"}
PROJECTION_FILE = "projection.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"


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


def _tiny_config(arch: str, config: dict[str, Any]):
    config_class = ARCHS[arch][0]
    if arch == "bert":
        vocab_size = len(bundled_vocab())
        config = {"vocab_size": vocab_size, **config}
        if config["vocab_size"] < vocab_size:
            raise UsageError(f"text encoder vocab_size {config['vocab_size']} is smaller than the bundled vocab "
                             f"{VOCAB_FILE} ({vocab_size} tokens)")
    return config_class(**config)


def _load_pretrained(model_class, name: str, **kwargs):
    try:
        return model_class.from_pretrained(name, **kwargs)
    except OSError as error:
        raise UsageError(f"cannot load pretrained {name!r} (nothing is downloaded: give a local folder or a "
                         f"name in the local Hugging Face cache): {error}") from error


def build_encoder(spec: dict[str, Any], modality: str) -> PreTrainedModel:
    """A transformers encoder from a spec: pretrained weights, or random init from a (tiny) config."""
    arch, pretrained, config = check_spec(spec, modality)
    model_class = ARCHS[arch][1]
    # Poolers we never use would be parameters without gradients (DDP and ZeRO complain).
    kwargs = {"add_pooling_layer": False} if arch in ("vit", "bert") else {}
    if pretrained is not None:
        # 'config' next to 'pretrained' overrides config fields, e.g. {layerdrop: 0.0, mask_time_prob: 0.0}
        return _load_pretrained(model_class, pretrained, **kwargs, **(config or {}))
    return model_class(_tiny_config(arch, config), **kwargs)


def build_tokenizer(spec: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The text encoder's tokenizer; a tiny config gets a WordPiece tokenizer over the bundled vocab."""
    _, pretrained, config = check_spec(spec, "text")
    if pretrained is not None:
        return _load_pretrained(BertTokenizerFast, pretrained)
    max_length = _tiny_config("bert", config).max_position_embeddings
    return BertTokenizerFast(vocab=bundled_vocab(), model_max_length=max_length)


def image_processing(spec: dict[str, Any]) -> dict[str, Any]:
    """Input size and normalisation of a vision encoder: {"image_size", "image_mean", "image_std"}."""
    arch, name, config_kwargs = check_spec(spec, "vision")
    config_class = ARCHS[arch][0]
    if name is None:
        config = config_class(**config_kwargs)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        config = _load_pretrained(config_class, name)
        try:
            path = cached_file(name, PREPROCESSOR_FILE)
        except OSError as error:
            raise UsageError(f"cannot find {PREPROCESSOR_FILE} of vision encoder {name!r}: {error}") from error
        try:
            processor = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(processor, dict) or "image_mean" not in processor or "image_std" not in processor:
            raise UsageError(f"{path}: no image_mean/image_std")
        mean, std = processor["image_mean"], processor["image_std"]
    return {"image_size": int(config.image_size), "image_mean": [float(m) for m in mean],
            "image_std": [float(s) for s in std]}


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
    """Pooled CLS feature [N, Dv] of images [N, 3, H, W] (CLIP: post-layernorm pooler; ViT: final-layernorm CLS)."""
    outputs = encoder(pixel_values=pixel_values)
    if isinstance(encoder, CLIPVisionModel):
        return outputs.pooler_output
    return outputs.last_hidden_state[:, 0]


def text_features(encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence feature [N, Dt]: token states mean-pooled over the attention mask."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return masked_mean(states, attention_mask.bool())


def normalise_waveform(input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each waveform's valid samples, padding zeroed: the input convention of
    Wav2Vec2 checkpoints (their feature extractor's do_normalize), applied here so every caller gets it."""
    mask = attention_mask.to(input_values.dtype)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (input_values * mask).sum(-1, keepdim=True) / count
    var = (((input_values - mean) * mask) ** 2).sum(-1, keepdim=True) / count
    return (input_values - mean) / torch.sqrt(var + 1e-7) * mask


def audio_frame_features(
    encoder: Wav2Vec2Model, input_values: torch.Tensor, attention_mask: torch.Tensor, normalise: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame features [N, F, Da] (one per 20 ms) and the valid-frame mask [N, F] of waveforms [N, S].

    A frame is valid when its whole receptive field lies in the valid samples; S must be at least one receptive
    field (400 samples at 16 kHz). Waveforms are normalised (`normalise_waveform`) and padding is zeroed.
    Checkpoints with a group-norm feature extractor (feat_extract_norm="group", e.g. wav2vec2-base,
    wav2vec2-large-960h) were trained without attention masks, so, as the transformers Wav2Vec2 docs advise, they
    get zero padding and no mask; they normalise over the padded length, so their features depend slightly on
    padding. Layer-norm ones (e.g. -large-960h-lv60-self) do not. normalise=False: the caller has normalised the
    waveforms already (emi.features runs a long clip's normalised waveform through in windows).
    """
    if normalise:
        input_values = normalise_waveform(input_values, attention_mask)
    uses_mask = encoder.config.feat_extract_norm == "layer"
    states = encoder(input_values, attention_mask=attention_mask if uses_mask else None).last_hidden_state
    lengths = encoder._get_feat_extract_output_lengths(attention_mask.sum(-1))
    frame_mask = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
    return states, frame_mask


def audio_features(encoder: Wav2Vec2Model, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Clip feature [N, Da]: frame features mean-pooled over valid frames (zeros when no frame is valid)."""
    states, frame_mask = audio_frame_features(encoder, input_values, attention_mask)
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
            pooled = audio_features(self.audio, input_values, audio_attention_mask)
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
    for name in ("vision", "text", "audio"):
        encoder = getattr(model, name)
        if encoder is not None:
            encoder.save_pretrained(out_dir / name, state_dict=_sub_state_dict(state_dict, f"{name}."))
    (tokenizer or build_tokenizer(model.text_spec)).save_pretrained(out_dir / "text")
    if model.vision is not None:
        info = image_processing(model.vision_spec)
        preprocessor = _preprocessor_config(model.vision_spec["arch"], info)
        (out_dir / "vision" / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n")
    heads = {key: state_dict[key].detach().cpu().clone().contiguous() for key in sorted(expected)
             if key.endswith("_projection.weight") or key.startswith("logit_scale_")}
    save_file(heads, str(out_dir / PROJECTION_FILE),
              metadata={"max_logit_scale": str(math.exp(model.max_log_logit_scale))})
    return out_dir


def load_encoders(export_dir: str | Path) -> dict[str, Any]:
    """Frozen eval-mode encoders of an export folder for feature extraction.

    Returns {"vision", "text", "audio": encoder or None (not trained), "tokenizer",
    "image_processing": dict or None}.
    """
    export_dir = Path(export_dir)
    if not (export_dir / "text" / "config.json").is_file():
        raise UsageError(f"{export_dir}: not an encoder export folder (no text/config.json)")
    loaded: dict[str, Any] = {"vision": None, "text": None, "audio": None, "image_processing": None}
    for name in ("vision", "text", "audio"):
        config_path = export_dir / name / "config.json"
        if not config_path.is_file():
            continue
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as error:
            raise UsageError(f"{config_path}: not valid JSON ({error})") from error
        arch = MODEL_TYPE_ARCH.get(model_type)
        if arch not in MODALITY_ARCHS[name]:
            raise UsageError(f"{config_path}: model_type {model_type!r} is not a {name} encoder "
                             f"(expected one of {MODALITY_ARCHS[name]})")
        spec = {"arch": arch, "pretrained": str(export_dir / name), "config": None}
        encoder = build_encoder(spec, name).eval()
        encoder.requires_grad_(False)
        loaded[name] = encoder
        if name == "vision":
            loaded["image_processing"] = image_processing(spec)
    loaded["tokenizer"] = build_tokenizer({"arch": "bert", "pretrained": str(export_dir / "text"), "config": None})
    return loaded
