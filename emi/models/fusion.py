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
"""

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emi.config import FUSIONS
from emi.errors import UsageError
from emi.io import folder_problems, link_or_copy_folder, records_digest, write_json_atomic

MODALITIES = ("vision", "audio", "text")


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
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(out_dim, out_dim))


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


def check_fusion_options(modalities, fusion: str, tcn_kernel: int, d_model: int, transformer_heads: int,
                         num_segments: int, modality_dropout: float) -> None:
    """UsageError naming the `model.` key when these FusionModel arguments cannot make a model: what Stage II and a
    sweep's cells check before anything runs."""
    modalities = tuple(modalities)
    if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
        raise UsageError(f"model.modalities must be distinct names from {MODALITIES}, got {list(modalities)}")
    if fusion not in FUSIONS:
        raise UsageError(f"model.fusion must be one of {FUSIONS}, got {fusion!r}")
    if tcn_kernel < 1 or tcn_kernel % 2 == 0:
        raise UsageError(f"model.tcn_kernel must be odd (symmetric 'same' padding), got {tcn_kernel}")
    if transformer_heads < 1 or d_model % transformer_heads:
        raise UsageError(f"model.d_model {d_model} is not divisible by model.transformer_heads {transformer_heads}")
    if num_segments < 1:
        raise UsageError(f"model.num_segments must be at least 1, got {num_segments}")
    if not 0.0 <= modality_dropout < 1.0:
        raise UsageError(f"model.modality_dropout must be in [0, 1), got {modality_dropout}")


class FusionModel(nn.Module):
    """Stage II regressor of the six EMI intensities from per-frame vision/audio and sentence text features."""

    def __init__(
        self,
        vision_dim: int = 1024,  # defaults: CLIP ViT-L/14 pooler, Wav2Vec2-large, BERT-base
        audio_dim: int = 1024,
        text_dim: int = 768,
        d_model: int = 128,
        num_outputs: int = 6,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        temporal: bool = True,
        fusion: str = "qam",
        num_segments: int = 8,
        tcn_layers: int = 3,
        tcn_kernel: int = 3,
        lstm_hidden: int = 128,
        transformer_layers: int = 2,
        transformer_heads: int = 4,
        dropout: float = 0.1,
        modality_dropout: float = 0.0,
    ):
        super().__init__()
        check_fusion_options(modalities, fusion, tcn_kernel, d_model, transformer_heads, num_segments,
                             modality_dropout)
        modalities = tuple(modalities)
        self.modalities, self.fusion, self.temporal = modalities, fusion, temporal
        self.num_segments, self.modality_dropout = num_segments, modality_dropout
        self.dims = {"vision": vision_dim, "audio": audio_dim, "text": text_dim}
        self.register_buffer("enabled", torch.tensor([m in modalities for m in MODALITIES]), persistent=False)

        if "vision" in modalities:
            self.vision_tcn = TemporalConvNet(vision_dim, tcn_layers, tcn_kernel, dropout) if temporal else None
            self.vision_projection = projection(vision_dim, d_model, dropout)
        if "audio" in modalities:
            self.audio_lstm = GatedBiLSTM(audio_dim, lstm_hidden) if temporal else None
            audio_out = 2 * lstm_hidden if temporal else audio_dim
            self.audio_projection = projection(audio_out, d_model, dropout)
        if "text" in modalities:
            self.text_projection = projection(text_dim, d_model, dropout)
        if fusion in ("qam", "late"):  # one quality score per segment ("qam"), per emotion ("late")
            scores = 1 if fusion == "qam" else num_outputs
            self.quality = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(),
                                                           nn.Linear(d_model, scores)) for m in modalities})
        if fusion in ("concat", "late"):
            self.modality_embedding = nn.Parameter(torch.randn(len(MODALITIES), d_model) * 0.02)
        if fusion == "xattn":
            self.stand_ins = nn.Parameter(torch.randn(len(MODALITIES), d_model) * 0.02)  # vision, audio, text
            self.query_norm = nn.LayerNorm(d_model)
            attended = [m for m in ("vision", "audio") if m in modalities]
            self.key_norms = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in attended})
            self.cross_attention = nn.ModuleDict({m: nn.MultiheadAttention(
                d_model, transformer_heads, dropout=dropout, batch_first=True) for m in attended})
        self.position_embedding = nn.Parameter(torch.randn(num_segments, d_model) * 0.02)
        if fusion != "xattn":  # (created after the positional embedding: the other fusions' initialisation as before)
            self.empty_token = nn.Parameter(torch.randn(d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, transformer_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, transformer_layers, norm=nn.LayerNorm(d_model),
                                                 enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(d_model, num_outputs))
        if fusion == "late":
            self.experts = nn.ModuleDict({m: nn.Sequential(
                nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, num_outputs))
                for m in modalities})

    def _check_inputs(self, vision, vision_mask, audio, audio_mask, text, present) -> None:
        batch = present.shape[0]
        expected = {"vision": (vision, 3, self.dims["vision"]), "audio": (audio, 3, self.dims["audio"]),
                    "text": (text, 2, self.dims["text"])}
        for name, (tensor, ndim, dim) in expected.items():
            if tensor.dim() != ndim or tensor.shape[0] != batch or tensor.shape[-1] != dim or tensor.shape[1] == 0:
                raise ValueError(f"{name} features: expected {'[B, T, D]' if ndim == 3 else '[B, D]'} with B={batch},"
                                 f" T>=1, D={dim}; got {tuple(tensor.shape)}")
        if vision_mask.shape != vision.shape[:2] or audio_mask.shape != audio.shape[:2]:
            raise ValueError(f"masks must be [B, T] like their features: vision_mask {tuple(vision_mask.shape)}, "
                             f"audio_mask {tuple(audio_mask.shape)}")
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

        tokens = self._modality_tokens(vision, vision_mask, audio, audio_mask, text)
        if self.fusion == "concat":
            pooled = self._concat(tokens, present)
            weights = None
        elif self.fusion == "xattn":
            fused, weights = self._cross_attention(tokens, present)
            pooled = self.transformer(fused).mean(1)
        elif self.fusion == "late":
            return self._late(tokens, present)
        else:
            fused, weights = self._weighted_sum(tokens, present)
            pooled = self.transformer(fused + self.position_embedding).mean(1)
        return {"pred": torch.sigmoid(self.head(pooled)), "weights": weights}

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

    def _weighted_sum(self, tokens, present) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 8-10 ("qam") or equal weights ("mean") over the present modalities: fused [B, M, d], betas [B, M, 3]."""
        batch, segments = present.shape[0], self.num_segments
        empty = self.empty_token.expand(batch, segments, -1)
        stacked = torch.stack([tokens[m].expand(batch, segments, -1) if m in tokens else torch.zeros_like(empty)
                               for m in MODALITIES], dim=2)
        any_present = present.any(1)
        if self.fusion == "qam":
            scores = torch.cat([self.quality[m](tokens[m]).expand(batch, segments, 1) if m in tokens
                                else empty.new_zeros(batch, segments, 1) for m in MODALITIES], dim=-1)
            scores = scores.masked_fill(~present[:, None, :], float("-inf"))
            # A clip with nothing present would be all -inf (NaN softmax); its betas are zeroed below anyway.
            scores = scores.masked_fill(~any_present[:, None, None], 0.0)
            betas = torch.softmax(scores, dim=-1) * present[:, None, :]
        else:
            betas = present[:, None, :].to(empty.dtype) / present.sum(1).clamp(min=1)[:, None, None]
            betas = betas.expand(batch, segments, -1)
        fused = (betas[..., None] * stacked).sum(2)
        return torch.where(any_present[:, None, None], fused, empty), betas

    def _cross_attention(self, tokens, present) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-anchored dual cross-attention ("xattn"): fused [B, M, d] and the attention on real tokens [B, M, 3]."""
        batch, segments = present.shape[0], self.num_segments
        text = self.stand_ins[2].expand(batch, 1, -1)
        if "text" in tokens:
            text = torch.where(present[:, 2, None, None], tokens["text"], text)
        query = self.query_norm(text + self.position_embedding)
        fused, real = text + self.position_embedding, [present[:, 2, None].expand(-1, segments).to(query.dtype)]
        for index, name in enumerate(("vision", "audio")):
            if name not in tokens:  # not a modality of this model
                real.insert(index, torch.zeros_like(real[-1]))
                continue
            keys = self.key_norms[name](torch.cat([self.stand_ins[index].expand(batch, 1, -1),
                                                   tokens[name] + self.position_embedding], dim=1))
            ignored = torch.cat([present.new_zeros(batch, 1), ~present[:, index, None].expand(-1, segments)], dim=1)
            attended, attention = self.cross_attention[name](query, keys, keys, key_padding_mask=ignored)
            fused = fused + attended
            real.insert(index, 1 - attention[..., 0])
        return fused, torch.stack(real, dim=-1)

    def _late(self, tokens, present) -> dict[str, torch.Tensor]:
        """Quality-aware fusion of the modalities' own predictions ("late"), as `forward` returns it."""
        batch, num_outputs = present.shape[0], self.head[-1].out_features
        experts, scores = [], []
        for index, name in enumerate(MODALITIES):
            if name not in tokens:  # not a modality of this model: weight 0 below
                experts.append(present.new_zeros(batch, num_outputs, dtype=self.position_embedding.dtype))
                scores.append(torch.zeros_like(experts[-1]))
                continue
            token = tokens[name] + self.modality_embedding[index]
            pooled = self.transformer(token if name == "text" else token + self.position_embedding).mean(1)
            experts.append(torch.sigmoid(self.experts[name](pooled)))
            scores.append(self.quality[name](pooled))
        experts, scores = torch.stack(experts, dim=1), torch.stack(scores, dim=1)  # [B, 3, num_outputs]
        any_present = present.any(1)
        scores = scores.masked_fill(~present[..., None], float("-inf"))
        scores = scores.masked_fill(~any_present[:, None, None], 0.0)  # nothing present: no NaN (weights zeroed)
        weights = torch.softmax(scores, dim=1) * present[..., None]
        empty = torch.sigmoid(self.head(self.transformer(self.empty_token.expand(batch, 1, -1)).mean(1)))
        pred = torch.where(any_present[:, None], (weights * experts).sum(1), empty)
        return {"pred": pred, "weights": weights.transpose(1, 2), "experts": experts, "present": present}

    def _concat(self, tokens, present) -> torch.Tensor:
        """The baseline fusion: all modality tokens in one sequence, absent ones masked; masked mean of the outputs."""
        sequence, valid = [], []
        for index, name in enumerate(MODALITIES):
            if name in tokens:
                token = tokens[name] + self.modality_embedding[index]
                if name != "text":
                    token = token + self.position_embedding
                sequence.append(token)
                valid.append(present[:, index : index + 1].expand(-1, token.shape[1]))
        batch = present.shape[0]
        sequence.append(self.empty_token.expand(batch, 1, -1))
        valid.append(~present.any(1, keepdim=True))
        sequence, valid = torch.cat(sequence, dim=1), torch.cat(valid, dim=1)
        encoded = self.transformer(sequence, src_key_padding_mask=~valid)
        weights = valid[..., None].to(encoded.dtype)
        return (encoded * weights).sum(1) / weights.sum(1)


def present_modalities(batch: dict[str, Any]) -> torch.Tensor:
    """[B, 3] (vision, audio, text) of a Stage II batch (the `features` loader layout): which modalities a clip
    really has. A clip without an audio track or a transcript has that modality masked out, not zero-filled."""
    return torch.stack([batch["vision_mask"].any(1), batch["has_audio"] & batch["audio_mask"].any(1),
                        batch["has_text"]], dim=1)


def fusion_inputs(batch: dict[str, Any], present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The FusionModel keyword arguments of a Stage II batch; `present` defaults to `present_modalities`."""
    return {"vision": batch["vision"], "vision_mask": batch["vision_mask"], "audio": batch["audio"],
            "audio_mask": batch["audio_mask"], "text": batch["text"],
            "present": present_modalities(batch) if present is None else present}


FUSION_FORMAT = "emi-fusion/2"
FUSION_WEIGHTS, FUSION_CONFIG, FUSION_ENCODERS = "model.safetensors", "config.json", "encoders"


FUSION_CONFIG_KEYS = ("model", "labels", "encoders", "preprocessing", "num_frames")


def save_fusion(folder: Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                labels: list[str], encoders: Path, encoder_files: dict[str, dict], preprocessing: dict[str, Any],
                num_frames: int) -> None:
    """A self-contained checkpoint: weights (safetensors); the Stage I encoders the features came from, in
    `encoders/` (an encoder export folder: hard links to the export's files where the file system allows, copies
    otherwise); and config.json with the model arguments, the label order, each encoder file's size and sha256
    (`encoder_files`: emi.io.folder_records of the export, taken when training started, so a change since is
    caught here), how raw clips were prepared (fps, sample rate, frame size, face crop, ASR) and the frames per
    clip the model saw (0: all)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / FUSION_WEIGHTS))
    link_or_copy_folder(encoders, folder / FUSION_ENCODERS)
    changed = folder_problems(folder / FUSION_ENCODERS, encoder_files)
    if changed:
        raise RuntimeError(f"{encoders}: the encoders changed during training ({'; '.join(changed)})")
    config = {"format": FUSION_FORMAT, "model": model_config, "labels": list(labels),
              "encoders": {"source": str(encoders), "sha256": records_digest(encoder_files), "files": encoder_files},
              "preprocessing": preprocessing, "num_frames": num_frames}
    write_json_atomic(folder / FUSION_CONFIG, config)


def fusion_encoders(folder: str | Path, config: dict[str, Any]) -> Path:
    """The encoder export folder a `save_fusion` checkpoint carries, every file checked against the size and
    sha256 recorded at training time; UsageError naming the files that differ."""
    encoders = Path(folder) / FUSION_ENCODERS
    files = config["encoders"].get("files") if isinstance(config["encoders"], dict) else None
    if not isinstance(files, dict) or not files:
        raise UsageError(f"{Path(folder) / FUSION_CONFIG}: 'encoders' records no encoder files")
    changed = folder_problems(encoders, files)
    if changed:
        raise UsageError(f"{encoders}: not the encoders this checkpoint was trained with ({'; '.join(changed)})")
    return encoders


def load_fusion(folder: str | Path, device: torch.device | str = "cpu") -> tuple[FusionModel, dict[str, Any]]:
    """The model of a `save_fusion` folder in eval mode on `device`, and its config; UsageError naming the folder
    when it is not a usable checkpoint."""
    folder = Path(folder)
    try:
        config = json.loads((folder / FUSION_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{folder}: not a fusion checkpoint ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FUSION_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise UsageError(f"{folder / FUSION_CONFIG}: format {found!r}, expected {FUSION_FORMAT!r}")
    missing = [key for key in FUSION_CONFIG_KEYS if key not in config]
    if missing:
        raise UsageError(f"{folder / FUSION_CONFIG}: missing {missing}")
    try:
        model = FusionModel(**config["model"])
        model.load_state_dict(load_file(str(folder / FUSION_WEIGHTS)))
    except (OSError, SafetensorError, RuntimeError, TypeError, KeyError) as err:
        # missing or damaged weights, weights of another architecture, model arguments this code does not know
        raise UsageError(f"{folder}: not a usable fusion checkpoint ({type(err).__name__}: {err})") from None
    return model.to(device).eval(), config
