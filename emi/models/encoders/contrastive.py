"""The Stage I contrastive model: CLIP-style vision-text and CLAP-style audio-text alignment around one shared text
encoder (paper Sec. 3.3)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emi.errors import UsageError
from emi.models.encoders.build import build_encoder
from emi.models.encoders.pooling import audio_features, text_features, vision_features
from emi.models.encoders.preprocessing import audio_extractor


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
