"""What each data mode makes of a raw sample (`decode_sample`) and of a list of them (`collate`), and which of
a sample's entries it needs (`entries_to_read`: the reader reads only those).

clip         Stage II feature extraction, predict: T frames (uint8), the audio, labels, transcript.
frame        Stage I vision-text: one frame (uint8) and the prompt built from the labels.
audio        Stage I audio-text: an audio window and the prompt.
frame_audio  Stage I with both pairs from one sample.
features     Stage II training on extracted features: vision.npy [T, D], audio.npy [T, D], text.npy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from emi import EMI_EMOTIONS
from emi.data.decode import (
    AudioSpec,
    ImageSpec,
    SampleError,
    decode_json,
    decode_npy,
    decode_text,
    decode_wav,
    frame_view,
    label_vector,
    load_frame,
    open_jpeg,
    prepare_audio,
    uniform_indices,
)
from emi.data.reader import RawSample

# The entries each mode reads; anything else in a shard is passed over unread.
WANTED = {
    "clip": re.compile(r"json|txt|wav|\d+\.jpg"),
    "frame": re.compile(r"json|\d+\.jpg"),
    "audio": re.compile(r"json|wav"),
    "frame_audio": re.compile(r"json|wav|\d+\.jpg"),
    "features": re.compile(r"json|(?:vision|audio|text)\.npy"),
}
MODES = tuple(WANTED)
PROMPT_MODES = ("frame", "audio", "frame_audio")
FRAME_MODES = ("frame", "frame_audio")
_FRAME = re.compile(r"(\d+)\.jpg")


@dataclass(frozen=True)
class DecodeSpec:
    """What a sample becomes: the mode's tensors (module docstring), in training with augmentation and random views."""

    mode: str  # one of MODES
    train: bool = False
    image: ImageSpec = ImageSpec()
    audio: AudioSpec = AudioSpec()
    num_frames: int = 16  # clip and features modes: T, 0 = all, padded to the longest in the batch
    label_names: tuple[str, ...] = EMI_EMOTIONS
    prompt_fn: Callable[[dict], str] | None = None  # labels -> prompt: the frame, audio and frame_audio modes
    tokenizer: Any | None = None  # a Hugging Face tokenizer; tokenises the prompt (clip mode: the transcript)
    max_text_len: int = 64
    lazy_frames: bool = False  # clip mode: `frames` is a ClipFrames decoded chunk by chunk (emi predict: any length)


def entries_to_read(extensions: Sequence[str], spec: DecodeSpec, rng: np.random.Generator) -> set[str]:
    """Which of a sample's entries decoding uses (the reader reads only these): of the frames, in the frame modes
    one (a random one in training, drawn from `rng`, the middle one in eval), in clip mode `num_frames` spread
    evenly over the clip (all of them with 0); every other entry."""
    frames = sorted((extension for extension in extensions if _FRAME.fullmatch(extension)), key=_frame_index)
    if spec.mode in FRAME_MODES and frames:
        frames = [frames[int(rng.integers(len(frames))) if spec.train else len(frames) // 2]]
    elif spec.mode == "clip":
        frames = [frames[i] for i in uniform_indices(len(frames), spec.num_frames)]
    return {extension for extension in extensions if not _FRAME.fullmatch(extension)} | set(frames)


def decode_sample(raw: RawSample, spec: DecodeSpec, rng: np.random.Generator) -> dict[str, Any]:
    """A sample's tensors and values. `raw` holds the entries `entries_to_read` chose (in clip mode all of a clip's
    frames will do too); frames come out as uint8, to be normalised on the device (emi.data.decode.normalise)."""
    meta = decode_json(_entry(raw, "json"))
    labels, label_mask = label_vector(meta.get("labels", {}), spec.label_names)
    sample: dict[str, Any] = {
        "key": raw.key,
        "labels": labels,
        "label_mask": label_mask,
        "has_audio": bool(meta.get("has_audio", True)),
    }
    if spec.mode == "features":
        for name in ("vision", "audio"):
            features = decode_npy(_entry(raw, f"{name}.npy"), f"{name}.npy")
            if features.ndim != 2:
                raise SampleError(f"{name}.npy: shape {tuple(features.shape)}, expected [T, D]")
            sample[name] = features[uniform_indices(len(features), spec.num_frames)]
        sample["text"] = decode_npy(_entry(raw, "text.npy"), "text.npy")
        sample["has_text"] = bool(meta.get("has_text", True))
        return sample
    if spec.mode == "clip":
        frames = ClipFrames(raw, spec, rng)
        sample["frames"] = frames if spec.lazy_frames else torch.cat(list(frames.chunks(len(frames))))
        txt = raw.entries.get("txt")
        sample["transcript"] = decode_text(txt) if txt is not None else str(meta.get("transcript") or "")
    if spec.mode in ("frame", "frame_audio"):
        sample["pixel_values"] = _one_frame(raw, spec, rng)
    if spec.mode in ("clip", "audio", "frame_audio"):
        waveform, rate = decode_wav(_entry(raw, "wav"))
        sample["audio"] = prepare_audio(waveform, rate, spec.audio, spec.train, rng)
    if spec.mode in PROMPT_MODES:
        try:
            sample["prompt"] = spec.prompt_fn(meta.get("labels", {}))
        except (KeyError, ValueError) as err:  # labels the prompt needs are missing or malformed
            raise SampleError(f"json: no prompt from its labels ({type(err).__name__}: {err})") from None
    return sample


def collate(samples: Sequence[dict[str, Any]], spec: DecodeSpec) -> dict[str, Any]:
    first = samples[0]
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "labels": torch.stack([s["labels"] for s in samples]),
        "label_mask": torch.stack([s["label_mask"] for s in samples]),
        "has_audio": torch.tensor([s["has_audio"] for s in samples]),
    }
    if "source" in first:  # samples of a mix: the name of each one's source
        batch["source"] = [s["source"] for s in samples]
    if spec.mode == "features":
        batch["vision"], batch["vision_mask"] = pad_stack([s["vision"] for s in samples], spec.num_frames)
        batch["audio"], batch["audio_mask"] = pad_stack([s["audio"] for s in samples], spec.num_frames)
        if first["text"].ndim == 1:
            batch["text"] = torch.stack([s["text"] for s in samples])
        else:
            batch["text"], batch["text_mask"] = pad_stack([s["text"] for s in samples], 0)
        batch["has_text"] = torch.tensor([s["has_text"] for s in samples])
        return batch
    if "frames" in first:
        if spec.lazy_frames:
            batch["frames"] = [s["frames"] for s in samples]  # ClipFrames, one per clip
        else:
            batch["frames"], batch["frame_mask"] = pad_stack([s["frames"] for s in samples], spec.num_frames)
        batch["transcript"] = [s["transcript"] for s in samples]
    if "pixel_values" in first:
        pixels = [s["pixel_values"] for s in samples]
        batch["pixel_values"] = torch.stack(pixels, out=new_empty((len(pixels), *pixels[0].shape), pixels[0].dtype))
    if "audio" in first:
        audio, audio_mask = pad_stack([s["audio"] for s in samples], spec.audio.window)
        names = ("audio", "audio_mask") if spec.mode == "clip" else ("input_values", "audio_attention_mask")
        batch[names[0]], batch[names[1]] = audio, audio_mask
    if "prompt" in first:
        batch["prompt"] = [s["prompt"] for s in samples]
    if spec.tokenizer is not None:
        tokens = spec.tokenizer(
            batch["prompt"] if "prompt" in batch else batch["transcript"],
            padding="max_length",
            truncation=True,
            max_length=spec.max_text_len,
            return_tensors="pt",
        )
        batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
    return batch


def pad_stack(items: Sequence[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, ...] tensors into [B, L, ...] zero-padded along the first axis, with a [B, L] bool mask
    of the real entries. L = `length`, or the longest item when `length` is 0."""
    length = length or max(len(item) for item in items)
    padded = new_empty((len(items), length, *items[0].shape[1:]), items[0].dtype)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for row, item in enumerate(items):
        padded[row, : len(item)] = item
        padded[row, len(item) :] = 0
        mask[row, : len(item)] = True
    return padded, mask


def new_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a dataloader worker, in shared memory, so that handing the batch to
    the main process copies nothing (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def _entry(raw: RawSample, extension: str) -> bytes:
    data = raw.entries.get(extension)
    if data is None:
        raise SampleError(f"no .{extension} entry")
    return data


def _frame_index(extension: str) -> int:
    return int(_FRAME.fullmatch(extension).group(1))


def _frames(raw: RawSample) -> list[tuple[str, bytes]]:
    """(extension, JPEG bytes) of the sample's frames in frame order."""
    frames = sorted((ext for ext in raw.entries if _FRAME.fullmatch(ext)), key=_frame_index)
    if not frames:
        raise SampleError("no frames (NNNN.jpg entries)")
    return [(ext, raw.entries[ext]) for ext in frames]


class ClipFrames:
    """Clip mode's T frames, spread evenly over the clip and all seen through one view (the same crop and mirror),
    decoded `size` at a time by `chunks`: a long clip's frames are never all held decoded at once."""

    def __init__(self, raw: RawSample, spec: DecodeSpec, rng: np.random.Generator):
        frames = _frames(raw)
        self.chosen = [frames[i] for i in uniform_indices(len(frames), spec.num_frames)]
        ext, data = self.chosen[0]
        self.view = frame_view(*open_jpeg(data, ext).size, spec.train, rng)
        self.size = spec.image.size

    def __len__(self) -> int:
        return len(self.chosen)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """uint8 frames [<= size, 3, S, S] (normalised by the consumer, on its device), in order; SampleError at
        a frame that does not decode."""
        for start in range(0, len(self.chosen), size):
            yield torch.stack(
                [
                    load_frame(open_jpeg(data, ext), ext, self.view, self.size)
                    for ext, data in self.chosen[start : start + size]
                ]
            )


def _one_frame(raw: RawSample, spec: DecodeSpec, rng: np.random.Generator) -> torch.Tensor:
    """The frame `entries_to_read` chose, uint8 [3, size, size]."""
    frames = _frames(raw)
    if len(frames) != 1:
        raise ValueError(
            f"sample {raw.key!r}: {len(frames)} frames; frame modes decode the one frame that entries_to_read chose"
        )
    ext, data = frames[0]
    image = open_jpeg(data, ext)
    return load_frame(image, ext, frame_view(*image.size, spec.train, rng), spec.image.size)
