"""Stage II: the temporal quality-aware fusion model (paper Sec. 3.3-3.5, Eqs. 3-10) on frozen Stage I features.

For one clip, with d = d_model and M = num_segments:

    vision [T, Dv] -> TCN (Eq. 3) -> segment means over M segments (Eq. 6) -> MLP (Eq. 5) -> h_v [M, d]
    audio  [T, Da] -> BiLSTM (Eq. 4) -> gated attention (Eq. 7) -> segment means -> MLP -> h~_a [M, d]
    text   [Dt]    -> MLP -> f_s [d], broadcast to the M segments
    fusion "qam":    q_m = MLP_m(h_m) per modality and segment (Eq. 8); beta = softmax of q over the modalities
                     PRESENT for the clip (Eq. 9); fused = beta_v h_v + beta_a h~_a + beta_s f_s (Eq. 10)
           "mean":   the same with equal weights over the present modalities
           "concat": the paper's baseline: the tokens of all modalities concatenated along time (Eq. 5)
           "xattn":  text-anchored dual cross-attention (as TAEMI, ABAW10): the text token, plus the positional
                     embedding, queries the vision segments and, separately, the audio segments;
                     fused = query + attn_v + attn_a. Each modality has a learned stand-in token: it replaces the
                     text query when the transcript is absent, and it is always one of the keys of its
                     modality's attention, the only one when the modality is absent or dropped; so a query can
                     also turn to the stand-in when the real segments look unreliable (an attention sink).
           "late":   quality-aware fusion of decisions: each present modality's tokens alone go through the
                     Transformer to that modality's own prediction p_m [6] (an expert head per modality);
                     w = softmax over the present modalities of a quality MLP's score per modality AND emotion;
                     pred = sum_m w_m * p_m. Each expert is also trained on its own (loss.unimodal, Stage II),
                     so the weights choose among predictors, per emotion (a modality may show one emotion well
                     and another badly), instead of mixing one feature vector for all six.
    -> + learned positional embedding -> Transformer encoder -> masked mean over tokens -> MLP head -> sigmoid

Eq. 10 adds the vision on the segment grid (h_v^m) to the audio on the frame grid (h~_a^t). Here both are put on
the same M-segment grid: audio features come aligned to the video frames (encoders.pool_audio_to_frames), the
gated BiLSTM runs over all frames and its outputs are pooled into the same segments as the vision.

Absent modalities (present False, all frames masked, dropped, or not in `modalities`) have their features zeroed
on entry and are masked out: -inf before the softmax ("qam", "late"), key padding in "concat", the stand-in token
in "xattn". A clip with no modality at all is predicted from a learned `empty` token (the stand-ins in "xattn"), so
the model never produces NaN. `modality_dropout` (training only) drops whole modalities of a clip before any fusion.
`temporal=False` is the paper's no-TFE ablation: features go to the per-step projection (Eq. 5) without TCN or
BiLSTM.

The model is built from a FusionSpec (emi.formats.fusion: the feature widths and the config's model section). Each
fusion kind is one Fusion subclass, registered under its name: the model builds the trunk every kind shares (the
modality encoders, the positional embedding, the Transformer, the head) first and the kind's own module last, so a
parameter added to one kind changes neither another kind's initial weights nor the trunk's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emi.formats.fusion import FusionSpec
from emi.models.options import FUSIONS, MODALITIES, check_fusion_options


def prefix_lengths(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Valid lengths [B] of a [B, T] mask that must mark a prefix of each row (padding at the end)."""
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError(f"{name} must mark a prefix of valid frames per clip (padding at the end)")
    return lengths


def segment_pool(x: torch.Tensor, lengths: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Means of x [B, T, D] over M equal-length segments of each clip's valid length (Eq. 6): [B, M, D].

    Segment m holds frames [floor(m L / M), floor((m + 1) L / M)). When L < M some of these are empty; an empty
    segment [k, k) takes frame k, the frame containing the segment's centre (m + 1/2) L / M.
    """
    segment = torch.arange(num_segments, device=x.device)[None, :]
    start = segment * lengths[:, None] // num_segments
    end = torch.maximum((segment + 1) * lengths[:, None] // num_segments, start + 1)
    frame = torch.arange(x.shape[1], device=x.device)[None, None, :]
    weights = ((frame >= start[..., None]) & (frame < end[..., None])).to(x.dtype)
    return (weights / weights.sum(-1, keepdim=True)) @ x


def gated_attention(h: torch.Tensor, gate: nn.Linear) -> torch.Tensor:
    """Eq. 7: alpha_t = sigmoid(W_g [h_t ; h_t - h_(t-1)]), h~_t = alpha_t * h_t, with h_0 - h_(-1) := 0."""
    previous = torch.cat([h[:, :1], h[:, :-1]], dim=1)
    alpha = torch.sigmoid(gate(torch.cat([h, h - previous], dim=-1)))
    return alpha * h


def drop_modalities(present: torch.Tensor, probability: float) -> torch.Tensor:
    """Drop each present modality of each clip with `probability`, never all present modalities of a clip."""
    kept = present & ~(torch.rand(present.shape, device=present.device) < probability)
    lost_all = present.any(1) & ~kept.any(1)
    # Such a clip keeps one of its present modalities, chosen at random.
    choice = torch.where(present, torch.rand(present.shape, device=present.device), -1.0).argmax(1)
    return kept | (F.one_hot(choice, present.shape[1]).bool() & lost_all[:, None])


def projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Modality mapping layer (Eq. 5); the input norm puts the frozen encoders' differently scaled features alike."""
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(out_dim, out_dim)
    )


class TemporalConvNet(nn.Module):
    """Stacked dilated residual 1-D convolutions (Eq. 3), dilation 2^i in layer i, non-causal 'same' padding.

    Padded steps are zeroed before every convolution (the usual convention): a valid step next to the padding
    then sees zeros there, exactly as at the edge of the unpadded clip, so padding never leaks into valid steps.
    """

    def __init__(self, channels: int, num_layers: int, kernel_size: int, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=2**i, padding=(kernel_size - 1) // 2 * 2**i)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[:, None, :].to(x.dtype)
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = h + self.dropout(F.gelu(conv(h * keep)))
        return (h * keep).transpose(1, 2)


class GatedBiLSTM(nn.Module):
    """BiLSTM over each clip's valid frames only (Eq. 4, packed sequences), then the gated attention (Eq. 7)."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden, batch_first=True, bidirectional=True)
        self.gate = nn.Linear(4 * hidden, 2 * hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Absent clips (length 0) run over one zero frame; the fusion masks them out.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        return gated_attention(h, self.gate)


class FusionModel(nn.Module):
    """Stage II regressor of the six EMI intensities from per-frame vision/audio and sentence text features."""

    def __init__(self, spec: FusionSpec):
        super().__init__()
        options = spec.options
        check_fusion_options(options)
        d_model = options.d_model
        self.spec = spec
        self.modalities, self.temporal = tuple(options.modalities), options.temporal
        self.num_segments, self.modality_dropout = options.num_segments, options.modality_dropout
        self.dims = spec.dims
        self.register_buffer("enabled", torch.tensor([m in self.modalities for m in MODALITIES]), persistent=False)
        if "vision" in self.modalities:
            self.vision_tcn = (
                TemporalConvNet(spec.vision_dim, options.tcn_layers, options.tcn_kernel, options.dropout)
                if options.temporal
                else None
            )
            self.vision_projection = projection(spec.vision_dim, d_model, options.dropout)
        if "audio" in self.modalities:
            self.audio_lstm = GatedBiLSTM(spec.audio_dim, options.lstm_hidden) if options.temporal else None
            audio_out = 2 * options.lstm_hidden if options.temporal else spec.audio_dim
            self.audio_projection = projection(audio_out, d_model, options.dropout)
        if "text" in self.modalities:
            self.text_projection = projection(spec.text_dim, d_model, options.dropout)
        self.position_embedding = nn.Parameter(torch.randn(options.num_segments, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            options.transformer_heads,
            4 * d_model,
            options.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, options.transformer_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.head = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(options.dropout), nn.Linear(d_model, spec.num_outputs)
        )
        self.fusion = Fusion.kinds[options.fusion](spec)  # last: see the module docstring

    def _check_inputs(self, vision, vision_mask, audio, audio_mask, text, present) -> None:
        batch = present.shape[0]
        expected = {
            "vision": (vision, 3, self.dims["vision"]),
            "audio": (audio, 3, self.dims["audio"]),
            "text": (text, 2, self.dims["text"]),
        }
        for name, (tensor, ndim, dim) in expected.items():
            if tensor.dim() != ndim or tensor.shape[0] != batch or tensor.shape[-1] != dim or tensor.shape[1] == 0:
                raise ValueError(
                    f"{name} features: expected {'[B, T, D]' if ndim == 3 else '[B, D]'} with B={batch},"
                    f" T>=1, D={dim}; got {tuple(tensor.shape)}"
                )
        if vision_mask.shape != vision.shape[:2] or audio_mask.shape != audio.shape[:2]:
            raise ValueError(
                f"masks must be [B, T] like their features: vision_mask {tuple(vision_mask.shape)}, "
                f"audio_mask {tuple(audio_mask.shape)}"
            )
        if present.shape != (batch, len(MODALITIES)):
            raise ValueError(f"present must be [B, 3] (vision, audio, text), got {tuple(present.shape)}")

    def forward(
        self,
        vision: torch.Tensor,
        vision_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_mask: torch.Tensor,
        text: torch.Tensor,
        present: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """pred [B, num_outputs] in [0, 1]; weights [B, M, 3]: the betas ("qam"; equal for "mean"), for "xattn" the
        share of each query's attention on the real vision / audio segments rather than the stand-in (text: 1 where
        present), for "late" [B, num_outputs, 3]: each emotion's weights of the modalities' predictions; None for
        "concat". "late" also returns `experts` [B, 3, num_outputs] (each modality's own prediction) and `present`
        [B, 3] (the modalities it saw, after modality dropout): what loss.unimodal trains the experts on."""
        self._check_inputs(vision, vision_mask, audio, audio_mask, text, present)
        vision_mask, audio_mask = vision_mask.bool(), audio_mask.bool()
        prefix_lengths(vision_mask, "vision_mask")
        prefix_lengths(audio_mask, "audio_mask")
        present = present.bool() & self.enabled
        present = present & torch.stack([vision_mask.any(1), audio_mask.any(1), present[:, 2]], dim=1)
        if self.training and self.modality_dropout > 0:
            present = drop_modalities(present, self.modality_dropout)
        vision_mask = vision_mask & present[:, :1]
        audio_mask = audio_mask & present[:, 1:2]
        # Zero what is absent or padded: from here on its values cannot reach anything (not even as NaN).
        vision = torch.where(vision_mask[..., None], vision, 0.0)
        audio = torch.where(audio_mask[..., None], audio, 0.0)
        text = torch.where(present[:, 2:], text, 0.0)
        return self.fusion(self._modality_tokens(vision, vision_mask, audio, audio_mask, text), present, self)

    def _modality_tokens(self, vision, vision_mask, audio, audio_mask, text) -> dict[str, torch.Tensor]:
        """Per-modality features in the shared space: vision/audio [B, M, d], text [B, 1, d]."""
        tokens = {}
        if "vision" in self.modalities:
            if self.vision_tcn is not None:
                vision = self.vision_tcn(vision, vision_mask)
            tokens["vision"] = self.vision_projection(segment_pool(vision, vision_mask.sum(1), self.num_segments))
        if "audio" in self.modalities:
            lengths = audio_mask.sum(1)
            if self.audio_lstm is not None:
                audio = self.audio_lstm(audio, lengths)
            tokens["audio"] = self.audio_projection(segment_pool(audio, lengths, self.num_segments))
        if "text" in self.modalities:
            tokens["text"] = self.text_projection(text)[:, None, :]
        return tokens

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled tokens [B, d]: intensities in [0, 1]."""
        return torch.sigmoid(self.head(pooled))


class Fusion(nn.Module):
    """How a clip's modality tokens become its prediction; one subclass per kind, registered under its name.

    forward(tokens, present, trunk): tokens {modality: [B, M or 1, d]} of the model's modalities, present [B, 3],
    trunk the FusionModel (its positional embedding, Transformer and head) -> FusionModel.forward's output."""

    kinds: ClassVar[dict[str, type[Fusion]]] = {}
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Fusion.kinds[cls.name] = cls

    def __init__(self, spec: FusionSpec):
        super().__init__()
        self.d_model, self.num_segments = spec.options.d_model, spec.options.num_segments
        self.num_outputs, self.modalities = spec.num_outputs, tuple(spec.options.modalities)


def empty_token(d_model: int) -> nn.Parameter:
    """The token a clip with no modality at all is predicted from."""
    return nn.Parameter(torch.randn(d_model) * 0.02)


def quality_scores(modalities: tuple[str, ...], d_model: int, scores: int) -> nn.ModuleDict:
    """A quality MLP per modality (Eq. 8): `scores` per token."""
    return nn.ModuleDict(
        {m: nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, scores)) for m in modalities}
    )


class WeightedSum(Fusion):
    """Eqs. 8-10 ("qam") or equal weights ("mean") over the present modalities, segment by segment, then the
    Transformer over the fused segments."""

    name = "mean"

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        self.empty_token = empty_token(self.d_model)

    def betas(self, tokens: dict[str, torch.Tensor], present: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """[B, M, 3]: equal weights over the present modalities."""
        betas = present[:, None, :].to(empty.dtype) / present.sum(1).clamp(min=1)[:, None, None]
        return betas.expand(present.shape[0], self.num_segments, -1)

    def forward(self, tokens, present, trunk) -> dict[str, torch.Tensor]:
        batch, segments = present.shape[0], self.num_segments
        empty = self.empty_token.expand(batch, segments, -1)
        stacked = torch.stack(
            [tokens[m].expand(batch, segments, -1) if m in tokens else torch.zeros_like(empty) for m in MODALITIES],
            dim=2,
        )
        betas = self.betas(tokens, present, empty)
        fused = torch.where(present.any(1)[:, None, None], (betas[..., None] * stacked).sum(2), empty)
        pooled = trunk.transformer(fused + trunk.position_embedding).mean(1)
        return {"pred": trunk.predict(pooled), "weights": betas}


class QualityAware(WeightedSum):
    """The paper's quality-aware module: beta = softmax over the present modalities of q_m = MLP_m(h_m)."""

    name = "qam"

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        self.quality = quality_scores(self.modalities, self.d_model, 1)

    def betas(self, tokens, present, empty) -> torch.Tensor:
        batch, segments = present.shape[0], self.num_segments
        scores = torch.cat(
            [
                self.quality[m](tokens[m]).expand(batch, segments, 1)
                if m in tokens
                else empty.new_zeros(batch, segments, 1)
                for m in MODALITIES
            ],
            dim=-1,
        )
        scores = scores.masked_fill(~present[:, None, :], float("-inf"))
        # A clip with nothing present would be all -inf (NaN softmax); its betas are zeroed below anyway.
        scores = scores.masked_fill(~present.any(1)[:, None, None], 0.0)
        return torch.softmax(scores, dim=-1) * present[:, None, :]


class Concatenation(Fusion):
    """The paper's baseline: all modality tokens in one sequence, absent ones masked; masked mean of the outputs."""

    name = "concat"

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        self.modality_embedding = nn.Parameter(torch.randn(len(MODALITIES), self.d_model) * 0.02)
        self.empty_token = empty_token(self.d_model)

    def forward(self, tokens, present, trunk) -> dict[str, torch.Tensor | None]:
        sequence, valid = [], []
        for index, name in enumerate(MODALITIES):
            if name in tokens:
                token = tokens[name] + self.modality_embedding[index]
                if name != "text":
                    token = token + trunk.position_embedding
                sequence.append(token)
                valid.append(present[:, index : index + 1].expand(-1, token.shape[1]))
        sequence.append(self.empty_token.expand(present.shape[0], 1, -1))
        valid.append(~present.any(1, keepdim=True))
        sequence, valid = torch.cat(sequence, dim=1), torch.cat(valid, dim=1)
        encoded = trunk.transformer(sequence, src_key_padding_mask=~valid)
        weights = valid[..., None].to(encoded.dtype)
        return {"pred": trunk.predict((encoded * weights).sum(1) / weights.sum(1)), "weights": None}


class CrossAttention(Fusion):
    """Text-anchored dual cross-attention (as TAEMI, ABAW10): the text token plus the positional embedding queries
    the vision segments and, separately, the audio segments; fused = query + attn_v + attn_a. A learned stand-in
    token per modality replaces the text query when the transcript is absent, and is always one of the keys of its
    modality's attention (the only one when the modality is absent): an attention sink."""

    name = "xattn"

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        options = spec.options
        self.stand_ins = nn.Parameter(torch.randn(len(MODALITIES), self.d_model) * 0.02)  # vision, audio, text
        self.query_norm = nn.LayerNorm(self.d_model)
        attended = [m for m in ("vision", "audio") if m in self.modalities]
        self.key_norms = nn.ModuleDict({m: nn.LayerNorm(self.d_model) for m in attended})
        self.cross_attention = nn.ModuleDict(
            {
                m: nn.MultiheadAttention(
                    self.d_model, options.transformer_heads, dropout=options.dropout, batch_first=True
                )
                for m in attended
            }
        )

    def forward(self, tokens, present, trunk) -> dict[str, torch.Tensor]:
        """weights [B, M, 3]: the share of each query's attention on the real segments (text: 1 where present)."""
        batch, segments = present.shape[0], self.num_segments
        text = self.stand_ins[2].expand(batch, 1, -1)
        if "text" in tokens:
            text = torch.where(present[:, 2, None, None], tokens["text"], text)
        query = self.query_norm(text + trunk.position_embedding)
        fused, real = text + trunk.position_embedding, [present[:, 2, None].expand(-1, segments).to(query.dtype)]
        for index, name in enumerate(("vision", "audio")):
            if name not in tokens:  # not a modality of this model
                real.insert(index, torch.zeros_like(real[-1]))
                continue
            keys = self.key_norms[name](
                torch.cat([self.stand_ins[index].expand(batch, 1, -1), tokens[name] + trunk.position_embedding], dim=1)
            )
            ignored = torch.cat([present.new_zeros(batch, 1), ~present[:, index, None].expand(-1, segments)], dim=1)
            attended, attention = self.cross_attention[name](query, keys, keys, key_padding_mask=ignored)
            fused = fused + attended
            real.insert(index, 1 - attention[..., 0])
        return {"pred": trunk.predict(trunk.transformer(fused).mean(1)), "weights": torch.stack(real, dim=-1)}


class Late(Fusion):
    """Quality-aware fusion of decisions: each present modality's tokens alone go through the Transformer to that
    modality's own prediction (an expert head per modality); w = softmax over the present modalities of a quality
    score per modality AND emotion; pred = sum_m w_m * p_m. The experts are also trained on their own
    (loss.unimodal), so the weights choose among predictors, per emotion."""

    name = "late"

    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        dropout = spec.options.dropout
        self.quality = quality_scores(self.modalities, self.d_model, self.num_outputs)
        self.modality_embedding = nn.Parameter(torch.randn(len(MODALITIES), self.d_model) * 0.02)
        self.empty_token = empty_token(self.d_model)
        self.experts = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(self.d_model, self.d_model),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(self.d_model, self.num_outputs),
                )
                for m in self.modalities
            }
        )

    def forward(self, tokens, present, trunk) -> dict[str, torch.Tensor]:
        batch = present.shape[0]
        experts, scores = [], []
        for index, name in enumerate(MODALITIES):
            if name not in tokens:  # not a modality of this model: weight 0 below
                experts.append(present.new_zeros(batch, self.num_outputs, dtype=trunk.position_embedding.dtype))
                scores.append(torch.zeros_like(experts[-1]))
                continue
            token = tokens[name] + self.modality_embedding[index]
            pooled = trunk.transformer(token if name == "text" else token + trunk.position_embedding).mean(1)
            experts.append(torch.sigmoid(self.experts[name](pooled)))
            scores.append(self.quality[name](pooled))
        experts, scores = torch.stack(experts, dim=1), torch.stack(scores, dim=1)  # [B, 3, num_outputs]
        any_present = present.any(1)
        scores = scores.masked_fill(~present[..., None], float("-inf"))
        scores = scores.masked_fill(~any_present[:, None, None], 0.0)  # nothing present: no NaN (weights zeroed)
        weights = torch.softmax(scores, dim=1) * present[..., None]
        empty = trunk.predict(trunk.transformer(self.empty_token.expand(batch, 1, -1)).mean(1))
        pred = torch.where(any_present[:, None], (weights * experts).sum(1), empty)
        return {"pred": pred, "weights": weights.transpose(1, 2), "experts": experts, "present": present}


assert set(Fusion.kinds) == set(FUSIONS), "every fusion kind has its class, and no class is nameless"


def present_modalities(batch: dict[str, Any]) -> torch.Tensor:
    """[B, 3] (vision, audio, text) of a Stage II batch (the `features` loader layout): which modalities a clip
    really has. A clip without an audio track or a transcript has that modality masked out, not zero-filled."""
    return torch.stack(
        [batch["vision_mask"].any(1), batch["has_audio"] & batch["audio_mask"].any(1), batch["has_text"]], dim=1
    )


def fusion_inputs(batch: dict[str, Any], present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The FusionModel keyword arguments of a Stage II batch; `present` defaults to `present_modalities`."""
    return {
        "vision": batch["vision"],
        "vision_mask": batch["vision_mask"],
        "audio": batch["audio"],
        "audio_mask": batch["audio_mask"],
        "text": batch["text"],
        "present": present_modalities(batch) if present is None else present,
    }
