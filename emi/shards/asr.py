"""Transcripts: imported from a CSV (Filename, Text) or recognised with Whisper (`--asr whisper:NAME_OR_PATH`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from emi.errors import UsageError
from emi.shards.labels import FILENAME_COLUMN, read_csv_rows

if TYPE_CHECKING:
    import numpy as np

WHISPER_RATE = 16000
WHISPER_WINDOW_S = 30  # Whisper hears 30 s at a time: longer clips are transcribed window by window


def parse_asr(spec: str) -> str | None:
    """The Whisper model name or path of an --asr spec, None for 'none'."""
    if spec == "none":
        return None
    kind, _, model = spec.partition(":")
    if kind != "whisper" or not model:
        raise UsageError(f"--asr must be 'none' or 'whisper:NAME_OR_PATH', got {spec!r}")
    return model


def check_whisper(model: str) -> None:
    """Fail early, in the parent, when the model cannot be found (workers would fail on every clip)."""
    from transformers import WhisperConfig

    try:
        WhisperConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UsageError(f"--asr whisper:{model}: cannot load the Whisper model ({err})") from None


def read_transcripts(path: str | Path) -> dict[str, str]:
    """Clip id (stem of Filename) -> text."""
    _, rows = read_csv_rows(path, (FILENAME_COLUMN, "Text"))
    transcripts: dict[str, str] = {}
    for line, row in rows:
        key = Path(row[FILENAME_COLUMN].strip()).stem
        if not key:
            raise UsageError(f"{path}: line {line} has an empty {FILENAME_COLUMN}")
        if key in transcripts:
            raise UsageError(f"{path}: line {line} repeats clip id {key!r}")
        transcripts[key] = row["Text"]
    return transcripts


class WhisperTranscriber:
    """One Whisper model, loaded once per worker process."""

    def __init__(self, model: str):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.processor = WhisperProcessor.from_pretrained(model)
        self.model = WhisperForConditionalGeneration.from_pretrained(model, dtype=dtype).to(self.device).eval()

    def __call__(self, audio: np.ndarray, sample_rate: int) -> str:
        import torch
        import torchaudio

        if audio.size == 0:
            return ""
        if sample_rate != WHISPER_RATE:
            audio = torchaudio.functional.resample(torch.from_numpy(audio), sample_rate, WHISPER_RATE).numpy()
        window = WHISPER_WINDOW_S * WHISPER_RATE
        texts = []
        for start in range(0, audio.size, window):
            features = self.processor.feature_extractor(
                audio[start : start + window], sampling_rate=WHISPER_RATE, return_tensors="pt"
            ).input_features
            with torch.inference_mode():
                tokens = self.model.generate(features.to(self.device, self.model.dtype))
            texts.append(self.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip())
        return " ".join(text for text in texts if text)
