"""How an encoder's states become features (paper Sec. 3.1): vision = the pooled CLS token per frame, text = token
states mean-pooled over the attention mask, audio = Wav2Vec2-style states (20 ms frames) mean-pooled over valid
frames, or kept per frame for Stage II and averaged into each video frame's time window (`pool_audio_to_frames`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.feature_extraction_utils import FeatureExtractionMixin

from emi.models.encoders.preprocessing import WAV2VEC2_INPUT, log_mel, prepare_waveform

# How each family's states become one feature, whatever the arch (vision_features, text_features, audio_features).
#   cls:    the first token of the last hidden states (after the final norm)
#   pooler: the model's own pooler_output (CLIP: post-norm CLS; SigLIP: its attention-pooling head)
#   mean:   the mean over valid positions: text tokens under the attention mask, audio frames whose receptive
#           field lies in the valid samples (as the paper pools BERT and Wav2Vec2)
# Only vision families differ: every text and audio family is mean-pooled (listed for the record). A vision family
# not listed takes its pooler_output where the model gives one, else cls.
AUTO_POOLING = {
    "vit": "cls",
    "deit": "cls",
    "dinov2": "cls",
    "dinov2_with_registers": "cls",
    "clip_vision_model": "pooler",
    "siglip_vision_model": "pooler",
    "wav2vec2": "mean",
    "hubert": "mean",
    "wavlm": "mean",
    "data2vec-audio": "mean",
    "whisper": "mean",
    "bert": "mean",
    "roberta": "mean",
    "xlm-roberta": "mean",
    "electra": "mean",
    "distilbert": "mean",
    "modernbert": "mean",
    "mpnet": "mean",
}


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


def audio_frame_grid(
    encoder: PreTrainedModel, extractor: FeatureExtractionMixin = WAV2VEC2_INPUT
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


def audio_frame_features(
    encoder: PreTrainedModel,
    input_values: torch.Tensor,
    attention_mask: torch.Tensor,
    extractor: FeatureExtractionMixin = WAV2VEC2_INPUT,
    prepare: bool = True,
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


def audio_features(
    encoder: PreTrainedModel,
    input_values: torch.Tensor,
    attention_mask: torch.Tensor,
    extractor: FeatureExtractionMixin = WAV2VEC2_INPUT,
) -> torch.Tensor:
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
        raise ValueError(
            f"expected audio_feats [F, D] and frame_mask [F], got {tuple(audio_feats.shape)} "
            f"and {tuple(frame_mask.shape)}"
        )
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
