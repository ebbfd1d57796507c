"""Safe decoding of sample entries and their preprocessing: JSON, text, 16-bit PCM WAV, JPEG frames.

Only these formats are ever decoded, from bytes, with json / `wave` / PIL; nothing is unpickled. Every
problem with an entry raises SampleError with the reason, which the loader turns into a skipped sample.
All randomness comes from the Generator passed in, which the loader derives from (seed, epoch, key).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import wave
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Training crops: random resized crop covering 80-100% of the frame at aspect ratio 3/4-4/3.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class SampleError(Exception):
    """A sample that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageSpec:
    """The vision encoder's input: square `size` pixels, normalised with `mean` and `std` per channel."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class AudioSpec:
    """The audio encoder's input.

    `seconds`: window length (centre crop in eval, random crop in training, zero-padded when shorter);
    0 keeps whole clips, padded to the longest in the batch. `gain_db` and `snr_db` are training
    augmentation ranges (random gain; additive white noise at a random SNR); None turns one off.
    """

    sample_rate: int = 16000
    seconds: float = 0.0
    gain_db: tuple[float, float] | None = None
    snr_db: tuple[float, float] | None = None

    @property
    def window(self) -> int:
        return round(self.seconds * self.sample_rate)


@dataclass(frozen=True)
class FrameView:
    """The crop of a frame to show, as fractions (left, top, right, bottom), and whether to mirror it."""

    box: tuple[float, float, float, float]
    flip: bool


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The Generator for one sample's random choices: the same whichever worker reads it, and after resume."""
    return np.random.default_rng([seed, epoch, _key_digest(key)])


def selection_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The Generator for which of a sample's frames to read (a stream apart from `sample_rng`'s)."""
    return np.random.default_rng([seed, epoch, _key_digest(key), 1])


def _key_digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def decode_json(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(f"json: not valid UTF-8 JSON ({err})") from None
    if not isinstance(value, dict):
        raise SampleError(f"json: expected an object, found {type(value).__name__}")
    return value


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise SampleError(f"txt: not UTF-8 ({err})") from None


def decode_wav(data: bytes) -> tuple[torch.Tensor, int]:
    """A 16-bit PCM WAV as a mono float waveform in [-1, 1] and its sample rate."""
    try:
        with wave.open(io.BytesIO(data)) as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            length = reader.getnframes()
            pcm = reader.readframes(length)
    except EOFError:
        raise SampleError("wav: not a readable WAV (the header ends before its chunks do)") from None
    except wave.Error as err:
        raise SampleError(f"wav: not a readable WAV ({err or 'a damaged header'})") from None
    if width != 2:
        raise SampleError(f"wav: {8 * width}-bit samples, expected 16-bit PCM")
    if len(pcm) != length * channels * width:
        raise SampleError(f"wav: truncated ({len(pcm)} of {length * channels * width} data bytes)")
    samples = np.frombuffer(pcm, dtype="<i2").reshape(length, channels).mean(axis=1, dtype=np.float32)
    return torch.from_numpy(samples / 32768.0), rate


def decode_npy(data: bytes, name: str) -> torch.Tensor:
    """A numeric .npy array as float32 (np.load with allow_pickle=False: object arrays are refused)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise SampleError(f"{name}: not a numeric .npy array ({err})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise SampleError(f"{name}: dtype {array.dtype} is not numeric")
    return torch.from_numpy(array.astype(np.float32))


def label_vector(labels: object, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Label values in `names` order and a mask; an absent, empty or NaN label is NaN with mask False."""
    if not isinstance(labels, dict):
        raise SampleError(f"json: 'labels' must be an object, found {type(labels).__name__}")
    values = []
    for name in names:
        value = labels.get(name)
        if value is None or value == "":
            values.append(math.nan)
            continue
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise SampleError(f"json: label {name!r} is {value!r}, not a number") from None
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor, ~torch.isnan(tensor)


def uniform_indices(count: int, wanted: int) -> list[int]:
    """`wanted` indices spread evenly over `count` items (round(linspace)); all of them when there are
    not more than `wanted`, or when `wanted` is 0."""
    if wanted <= 0 or count <= wanted:
        return list(range(count))
    return np.round(np.linspace(0, count - 1, wanted)).astype(int).tolist()


def frame_view(width: int, height: int, train: bool, rng: np.random.Generator) -> FrameView:
    """Eval: the centred square of the short side (= resize short side + centre crop). Train: a random
    resized crop (as torchvision's RandomResizedCrop, but with the area relative to the eval square, so
    that wide frames get crops as varied as square ones, at the scale eval shows) and a coin-flip mirror."""
    if train:
        area = min(width, height) ** 2
        for _ in range(10):
            target = area * rng.uniform(*CROP_SCALE)
            ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
                box = (left / width, top / height, (left + w) / width, (top + h) / height)
                return FrameView(box, bool(rng.integers(2)))
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left / width, top / height, (left + side) / width, (top + side) / height)
    return FrameView(box, train and bool(rng.integers(2)))


def open_jpeg(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SampleError(f"{name}: not an image ({err})") from None
    if image.format != "JPEG":
        raise SampleError(f"{name}: a {image.format} image, expected JPEG")
    return image


def load_frame(image: Image.Image, name: str, view: FrameView, size: int) -> torch.Tensor:
    """The view of a JPEG frame resized to size x size, uint8 [3, size, size].

    The resize is bicubic with antialiasing, PIL's filter, run by torch's uint8 kernel on the channels-last pixels
    (a few times faster than PIL's on one core; the two differ by at most 2 of 255 levels). The view's box is
    rounded to whole pixels, as torchvision's crops are.
    """
    width, height = image.size
    left, top, right, bottom = (view.box[0] * width, view.box[1] * height, view.box[2] * width, view.box[3] * height)
    short = min(right - left, bottom - top)
    if short >= 2 * size:
        # Let the JPEG decoder downscale by 2/4/8 first; the view keeps at least `size` pixels.
        image.draft("RGB", (math.ceil(width * size / short), math.ceil(height * size / short)))
        sx, sy = image.size[0] / width, image.size[1] / height
        left, top, right, bottom = left * sx, top * sy, right * sx, bottom * sy
    try:
        pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(f"{name}: corrupt JPEG ({err})") from None
    left, top = round(left), round(top)
    right, bottom = max(round(right), left + 1), max(round(bottom), top + 1)
    crop = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, top:bottom, left:right]
    resized = F.interpolate(
        crop.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bicubic", antialias=True
    )[0]
    return resized.flip(-1) if view.flip else resized


def normalise(pixels: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the tensor's device.

    The loader hands frames over as uint8 (a quarter of the bytes to collate, pin and copy); the consumer
    normalises them once they are on the device."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.float().div_(255.0).sub_(mean).div_(std)


def prepare_audio(
    waveform: torch.Tensor, rate: int, spec: AudioSpec, train: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resample to the encoder's rate, crop to the window, and in training augment."""
    if rate != spec.sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, spec.sample_rate)
    window = spec.window
    if window > 0 and waveform.numel() > window:
        excess = waveform.numel() - window
        start = int(rng.integers(excess + 1)) if train else excess // 2
        waveform = waveform[start : start + window]
    if train and spec.gain_db is not None:
        waveform = waveform * 10.0 ** (rng.uniform(*spec.gain_db) / 20.0)
    if train and spec.snr_db is not None and waveform.numel() > 0:
        power = float(waveform.pow(2).mean())
        noise_std = math.sqrt(power / 10.0 ** (rng.uniform(*spec.snr_db) / 10.0))
        noise = rng.standard_normal(waveform.numel()).astype(np.float32) * noise_std
        waveform = waveform + torch.from_numpy(noise)
    return waveform
