"""Stage I's encoders, one concern per module:

    build.py          an encoder (and the text encoder's tokenizer) from its spec: clip, vit, bert, wav2vec2, auto
    preprocessing.py  what each encoder takes in: image size and normalisation, the audio feature extractor
    pooling.py        how an encoder's states become features, per frame and per clip
    contrastive.py    the contrastive model that aligns vision and audio with text
    export.py         a Stage I export folder, written and loaded back

The names below are the package's interface; the modules import each other in that order only.
"""

from emi.models.encoders.build import build_encoder, build_tokenizer, bundled_vocab, check_spec
from emi.models.encoders.contrastive import ContrastiveModel
from emi.models.encoders.export import export_encoders, load_encoders
from emi.models.encoders.pooling import (
    audio_features,
    audio_frame_features,
    audio_frame_grid,
    masked_mean,
    pool_audio_to_frames,
    text_features,
    vision_features,
)
from emi.models.encoders.preprocessing import (
    WAV2VEC2_INPUT,
    audio_extractor,
    image_processing,
    log_mel,
    normalise_waveform,
    prepare_waveform,
)

__all__ = [
    "WAV2VEC2_INPUT",
    "ContrastiveModel",
    "audio_extractor",
    "audio_features",
    "audio_frame_features",
    "audio_frame_grid",
    "build_encoder",
    "build_tokenizer",
    "bundled_vocab",
    "check_spec",
    "export_encoders",
    "image_processing",
    "load_encoders",
    "log_mel",
    "masked_mean",
    "normalise_waveform",
    "pool_audio_to_frames",
    "prepare_waveform",
    "text_features",
    "vision_features",
]
