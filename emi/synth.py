"""`emi synth`: a synthetic EMI dataset of real mp4 clips whose labels must be read from how things change.

Layout written under `out`:
    videos/00001.mp4 ...  H.264 (constant bitrate) + AAC (constant bitrate), 25 fps, 128x128 (or `size`),
                          16 kHz mono, 2 to 8 s, no metadata
    labels.csv            Filename,Admiration,Amusement,Determination,Empathic Pain,Excitement,Joy (4 decimals);
                          with `labels="expression-va"`: Filename,Expression,Valence,Arousal (see Label kinds)
    transcripts.csv       Filename,Text
    corruption.csv        Filename,Corrupted (the corrupted modality or empty; for analysis only)

Generative model. Every clip i draws from its own random streams, seeded by (seed, i, stream), so a clip's
labels, duration, pixels, audio and words do not depend on the number of clips, on `workers`, or on each other
except through the labels.

Labels. Three latent factors p (positive), n (negative), d (drive) ~ N(0, 1) and one private part e_k ~ N(0, 1)
per emotion give x_k = loadings_k . (p, n, d) + sqrt(1 - |loadings_k|^2) e_k (unit variance) and
y_k = sigmoid(1.7 x_k - 1.2), rounded to 4 decimals: many low values (median 0.23), some high. Loadings (p, n, d):
Admiration (0.3, 0, 0.5), Amusement (0.7, 0, 0), Determination (0, 0, 0.7), Empathic Pain (-0.3, 0.7, 0),
Excitement (0.6, 0, 0.3), Joy (0.7, 0, 0). Every emotion keeps at least 40% of its variance private.

Label kinds. The clips are always rendered from the six intensities y; `labels` says what labels.csv records:
    emi            the six intensities (the default)
    expression-va  a second, differently labelled data set of the same world (a source to mix with the first):
                   Expression, the class of the strongest emotion (Joy, Amusement: Happiness; Excitement,
                   Admiration: Surprise; Empathic Pain: Sadness; Determination: Anger), Neutral when none reaches
                   0.3; Valence = mean(Joy, Amusement, Admiration) - Empathic Pain and
                   Arousal = 2 mean(Excitement, Amusement, Determination) - 1, both clipped to [-1, 1] (4 decimals).

Each modality sees its own noisy copy of the labels, c_k = clip(y_k + N(0, 0.08), 0, 1), drawn independently per
modality, so that fusing modalities helps. The duration (uniform 2 to 8 s, whole frames) and every nuisance
below are drawn independently of the labels. u = t / duration runs from 0 to 1 over the clip.

Video (W x H = 128x128 by default, 25 fps): a face (ellipse, two dark eyes, two eyebrows, a mouth) on a static
textured background (two coloured sinusoidal gratings of random orientation and frequency, their frequency in
cycles per short side) with per-frame pixel noise. The face's size scales with the short side S (rx is 0.22-0.28 S),
its position with W and H.
    Amusement      mouth opening oscillates, amplitude 0.5 ry * c (random rate 0.6-1.5 Hz, random phase)
    Joy            smile curvature ramps up over the clip: corners rise by 0.45 ry * c * u above a random baseline
    Excitement     head moves left-right, amplitude 0.15 W * c (random rate 0.4-1.2 Hz, random phase)
    Empathic Pain  face colour drifts from the skin colour toward blue, weight 0.75 c u
    Determination  eyebrows drop (0.15 ry * c) and tilt inward (0.5 rad * c) during 1-3 bursts of 0.8-1.6 s
    Admiration     eye radius pulses, relative amplitude 0.65 c (random rate 0.5-1.2 Hz, random phase)
    nuisance: face position, size (rx) and aspect (ry), skin colour, background, baseline smile and brow height,
    all rates and phases, burst times, pixel noise level.
Audio (16 kHz mono): a harmonic voice (20 harmonics, amplitudes k^-tilt) under a syllable envelope
(0.6 + 0.4 sin at 2.5-4.5 Hz), plus white background noise.
    Excitement     pitch vibrato, depth 0.15 c in log-frequency (random rate 4-7 Hz)
    Amusement      'laughter': during bursts of 0.8-1.4 s (one per 2.5 s) the syllable envelope gives way, with
                   weight c, to fast 'ha-ha' pulses at 8-12 Hz
    Joy            pitch glides up over the clip by 0.4 c u in log-frequency
    Empathic Pain  pitch glides down by 0.4 c u in log-frequency and the energy fades by 0.7 c u
    Determination  brighter voice: spectral tilt 1.8 - 1.3 c (more energy in the upper harmonics)
    Admiration     a rise-fall 'wow' pitch arch, 0.25 c sin(pi u) in log-frequency
    nuisance: base pitch (90-200 Hz), syllable rate (2.5-4.5 Hz), laughter rate and burst times, loudness,
    background noise level.
Transcript: lowercase words. Emotion k contributes round_random(max(0, 4 y_k + N(0, 1))) cue words drawn from
its own cue list (CUE_WORDS), mixed with 3-10 filler words and shuffled. 4% of clips (drawn independently of the
labels) get an empty transcript.

Corruption (`corrupt_modality`, `corrupt_frac`): exactly round(frac * clips) clips, chosen by the seed
independently of the labels, get one modality replaced by label-free noise that looks like noise:
    video  every frame is grey plus strong uniform pixel noise (+-110), the face is gone
    audio  loud white noise (std 0.3-0.5 of full scale) instead of the voice
    text   a word salad of 12-24 words drawn uniformly from all cue lists and fillers
The other modalities of a corrupted clip are exactly those of the clean clip.

File sizes carry no label: names are sequential, both streams are encoded at a constant bitrate with filler
(x264 nal-hrd=cbr; 400 kbit/s at 128x128, growing with the square root of the pixel count: about 1.5 Mbit/s at
640x360, a web video's rate), and metadata is stripped (-map_metadata -1, bitexact flags). With one encoder thread the
mp4 bytes are identical for identical seeds.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from emi import EMI_EMOTIONS
from emi.errors import UsageError

FPS = 25
FRAME_SIZE = 128
SAMPLE_RATE = 16000
MIN_FRAMES, MAX_FRAMES = 2 * FPS, 8 * FPS
MODALITIES = ("video", "audio", "text")
VIDEO_KBITS = 400  # at FRAME_SIZE x FRAME_SIZE; see video_bitrate
AUDIO_BITRATE = "32k"

# Rows follow EMI_EMOTIONS; columns are the (positive, negative, drive) latent factors.
LOADINGS = np.array(
    [
        [0.3, 0.0, 0.5],  # Admiration
        [0.7, 0.0, 0.0],  # Amusement
        [0.0, 0.0, 0.7],  # Determination
        [-0.3, 0.7, 0.0],  # Empathic Pain
        [0.6, 0.0, 0.3],  # Excitement
        [0.7, 0.0, 0.0],  # Joy
    ]
)
LABEL_SLOPE, LABEL_OFFSET = 1.7, 1.2
MODALITY_LABEL_NOISE = 0.08
CUE_WORDS = {
    "Admiration": ("wow", "amazing", "incredible", "impressive", "brilliant"),
    "Amusement": ("haha", "funny", "hilarious", "joke", "lol"),
    "Determination": ("must", "will", "goal", "focus", "determined"),
    "Empathic Pain": ("sorry", "hurts", "pain", "poor", "sad"),
    "Excitement": ("yes", "lets go", "woo", "awesome", "pumped"),
    "Joy": ("happy", "love", "glad", "wonderful", "smile"),
}
FILLER_WORDS = (
    "i",
    "the",
    "it",
    "was",
    "and",
    "so",
    "really",
    "just",
    "we",
    "that",
    "um",
    "well",
    "you",
    "know",
    "this",
    "then",
    "okay",
    "like",
    "there",
    "oh",
)
CUES_PER_UNIT_INTENSITY = 4.0
CUE_COUNT_NOISE = 1.0
EMPTY_TRANSCRIPT_PROB = 0.04
LABEL_KINDS = ("emi", "expression-va")
EXPRESSION_OF = {
    "Admiration": "Surprise",
    "Amusement": "Happiness",
    "Determination": "Anger",
    "Empathic Pain": "Sadness",
    "Excitement": "Surprise",
    "Joy": "Happiness",
}
NEUTRAL_BELOW = 0.3  # no emotion this strong: the expression is Neutral
# Independent random streams per clip; the index in this tuple is part of the seed.
STREAMS = ("labels", "duration", "video", "audio", "text", "corruption", "selection")


@dataclass(frozen=True)
class ClipPlan:
    """Everything a worker needs to write one clip; the media are rendered from (seed, index)."""

    index: int
    name: str
    labels: tuple[float, ...]
    num_frames: int
    corrupted: str | None
    size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)  # (width, height)


def parse_size(text: str) -> tuple[int, int]:
    """--size WxH as (width, height) (synthesize checks the numbers)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None:
        raise UsageError(f"--size must be WxH, e.g. 640x360, got {text!r}")
    return int(match[1]), int(match[2])


def video_bitrate(size: tuple[int, int]) -> str:
    """The constant video bitrate: VIDEO_KBITS at 128x128, growing with the square root of the pixel count."""
    return f"{round(VIDEO_KBITS * np.sqrt(size[0] * size[1]) / FRAME_SIZE)}k"


def clip_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, STREAMS.index(stream)])


def draw_labels(rng: np.random.Generator) -> np.ndarray:
    """Six intensities in [0, 1] from the latent factor model in the module docstring."""
    factors = rng.standard_normal(LOADINGS.shape[1])
    private = rng.standard_normal(len(EMI_EMOTIONS))
    latent = LOADINGS @ factors + np.sqrt(1.0 - (LOADINGS**2).sum(axis=1)) * private
    return np.round(1.0 / (1.0 + np.exp(-(LABEL_SLOPE * latent - LABEL_OFFSET))), 4)


def expression_va(labels: np.ndarray) -> list[str]:
    """The expression-va kind's Expression, Valence and Arousal cells for six intensities (module docstring)."""
    y = dict(zip(EMI_EMOTIONS, labels.tolist()))
    strongest = max(EMI_EMOTIONS, key=lambda name: y[name])  # ties: the first in EMI_EMOTIONS
    expression = EXPRESSION_OF[strongest] if y[strongest] >= NEUTRAL_BELOW else "Neutral"
    valence = (y["Joy"] + y["Amusement"] + y["Admiration"]) / 3 - y["Empathic Pain"]
    arousal = 2 * (y["Excitement"] + y["Amusement"] + y["Determination"]) / 3 - 1
    return [expression, *(f"{float(np.clip(value, -1.0, 1.0)):.4f}" for value in (valence, arousal))]


def label_table(plans: list[ClipPlan], kind: str) -> tuple[list[str], list[list[str]]]:
    """labels.csv's header and rows for the label kind `kind` (one of LABEL_KINDS)."""
    if kind == "expression-va":
        return ["Filename", "Expression", "Valence", "Arousal"], [
            [plan.name, *expression_va(np.array(plan.labels))] for plan in plans
        ]
    return ["Filename", *EMI_EMOTIONS], [[plan.name, *(f"{value:.4f}" for value in plan.labels)] for plan in plans]


def draw_num_frames(rng: np.random.Generator) -> int:
    return int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))


def noisy_copy(labels: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """One modality's view of the labels: independent noise per modality makes fusion worth it."""
    noisy = np.clip(labels + rng.normal(0.0, MODALITY_LABEL_NOISE, len(labels)), 0.0, 1.0)
    return dict(zip(EMI_EMOTIONS, noisy.tolist()))


def burst_envelope(
    t: np.ndarray, duration: float, rng: np.random.Generator, width: tuple[float, float], seconds_per_burst: float
) -> np.ndarray:
    """Raised-cosine bumps in [0, 1] at random times; at least one whole burst per clip."""
    envelope = np.zeros_like(t)
    for _ in range(max(1, round(duration / seconds_per_burst))):
        half = rng.uniform(*width) / 2
        centre = rng.uniform(half, max(half, duration - half))
        inside = np.abs(t - centre) < half
        envelope[inside] = np.maximum(envelope[inside], 0.5 + 0.5 * np.cos(np.pi * (t[inside] - centre) / half))
    return envelope


def render_background(rng: np.random.Generator, size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)) -> np.ndarray:
    """A static texture (H, W, 3) float32: two coloured gratings on a base colour."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / min(size)  # in short sides: the same look at any size
    background = np.broadcast_to(rng.uniform(40, 200, 3).astype(np.float32), (height, width, 3)).copy()
    for _ in range(2):
        angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        background += wave[..., None] * rng.uniform(-30, 30, 3).astype(np.float32)
    return background


def _segment_distance(
    xx: np.ndarray, yy: np.ndarray, ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray
) -> np.ndarray:
    """Distance of every pixel to the segment a-b, per frame (segment ends have shape (T, 1, 1))."""
    dx, dy = bx - ax, by - ay
    along = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(xx - ax - along * dx, yy - ay - along * dy)


def _rows(top: float, bottom: float, height: int) -> slice:
    """The frame rows a shape spanning [top, bottom] in y can touch."""
    return slice(max(0, int(np.floor(top)) - 1), min(height, int(np.ceil(bottom)) + 2))


def render_frames(
    labels: np.ndarray, num_frames: int, rng: np.random.Generator, size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)
) -> np.ndarray:
    """The face clip as uint8 (T, H, W, 3); see the module docstring for which label drives what."""
    c = noisy_copy(labels, rng)
    width, height = size
    duration = num_frames / FPS
    t = (np.arange(num_frames, dtype=np.float32) / FPS)[:, None, None]
    u = t / duration
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    rx = rng.uniform(0.22, 0.28) * min(size)
    ry = rx * rng.uniform(1.15, 1.3)
    head_rate, head_phase = rng.uniform(0.4, 1.2), rng.uniform(0, 2 * np.pi)
    head_swing = 0.15 * width * c["Excitement"] * np.sin(2 * np.pi * head_rate * t + head_phase)
    cx = rng.uniform(0.45, 0.55) * width + head_swing
    cy = rng.uniform(0.45, 0.55) * height
    skin = rng.uniform([150, 100, 70], [240, 190, 150]).astype(np.float32)
    blue = np.array([60, 90, 220], dtype=np.float32)
    blend = (0.75 * c["Empathic Pain"] * u)[..., None]
    face_colour = (1 - blend) * skin + blend * blue

    eye_rate, eye_phase = rng.uniform(0.5, 1.2), rng.uniform(0, 2 * np.pi)
    eye_radius = 0.17 * rx * (1 + 0.65 * c["Admiration"] * np.sin(2 * np.pi * eye_rate * t + eye_phase))
    eye_y = cy - 0.25 * ry
    eye_dx = 0.42 * rx

    brow_burst = burst_envelope(t[:, 0, 0], duration, rng, (0.8, 1.6), 3.0)[:, None, None]
    brow_drop = rng.uniform(-0.04, 0.04) * ry + 0.15 * ry * c["Determination"] * brow_burst
    brow_tilt = 0.5 * c["Determination"] * brow_burst
    brow_y = eye_y - 0.2 * ry + brow_drop
    brow_half = 0.2 * rx

    mouth_rate, mouth_phase = rng.uniform(0.6, 1.5), rng.uniform(0, 2 * np.pi)
    mouth_open = rng.uniform(0.02, 0.08) * ry + 0.5 * ry * c["Amusement"] * 0.5 * (
        1 - np.cos(2 * np.pi * mouth_rate * t + mouth_phase)
    )
    smile = (rng.uniform(-0.12, 0.05) + 0.45 * c["Joy"] * u) * ry
    mouth_y, mouth_half_width = cy + 0.45 * ry, 0.5 * rx

    frames = np.broadcast_to(render_background(rng, size), (num_frames, height, width, 3)).copy()
    # Each shape is tested only on the rows it can reach (vertical positions are fixed over the clip).
    rows = _rows(cy - ry, cy + ry, height)
    face = ((xx[rows] - cx) / rx) ** 2 + ((yy[rows] - cy) / ry) ** 2 <= 1.0
    np.copyto(frames[:, rows], face_colour, where=face[..., None])
    dark = np.array([25, 25, 35], dtype=np.float32)
    eye_rows = _rows(eye_y - 1.1 * eye_radius.max(), eye_y + 1.1 * eye_radius.max(), height)
    brow_thickness = 0.035 * ry
    brow_inner_y = brow_y + np.tan(brow_tilt) * 2 * brow_half
    brow_rows = _rows(brow_y.min() - brow_thickness, brow_inner_y.max() + brow_thickness, height)
    for side in (-1.0, 1.0):
        eye_x = cx + side * eye_dx
        eye = ((xx[eye_rows] - eye_x) / eye_radius) ** 2 + ((yy[eye_rows] - eye_y) / (1.1 * eye_radius)) ** 2 <= 1
        frames[:, eye_rows][eye] = dark
        # The inner brow end (nearer the nose) drops by the tilt.
        outer_x, inner_x = eye_x + side * brow_half, eye_x - side * brow_half
        brow = _segment_distance(xx[brow_rows], yy[brow_rows], outer_x, brow_y, inner_x, brow_inner_y)
        frames[:, brow_rows][brow <= brow_thickness] = dark
    reach = 0.5 * mouth_open.max() + 1.5
    mouth_rows = _rows(mouth_y - max(smile.max(), 0) - reach, mouth_y - min(smile.min(), 0) + reach, height)
    across = (xx[mouth_rows] - cx) / mouth_half_width
    centre_line = mouth_y - smile * across**2
    half_gap = 0.5 * mouth_open * np.sqrt(np.clip(1 - across**2, 0.0, 1.0)) + 1.5
    mouth = (np.abs(across) < 1) & (np.abs(yy[mouth_rows] - centre_line) < half_gap)
    frames[:, mouth_rows][mouth] = np.array([120, 30, 40], np.float32)

    frames += rng.uniform(3, 10) * rng.standard_normal((num_frames, height, width, 1), dtype=np.float32)
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8)


def noise_frames(
    num_frames: int, rng: np.random.Generator, size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)
) -> np.ndarray:
    """A corrupted video: grey plus strong pixel noise, no face left."""
    return rng.integers(128 - 110, 128 + 111, (num_frames, size[1], size[0], 3), dtype=np.uint8)


def render_audio(labels: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The voice as float32 in [-1, 1]; see the module docstring for which label drives what."""
    c = noisy_copy(labels, rng)
    duration = num_samples / SAMPLE_RATE
    t = np.arange(num_samples) / SAMPLE_RATE
    u = t / duration

    vibrato_rate, vibrato_phase = rng.uniform(4, 7), rng.uniform(0, 2 * np.pi)
    log_pitch = (
        np.log(rng.uniform(90, 200))
        + 0.15 * c["Excitement"] * np.sin(2 * np.pi * vibrato_rate * t + vibrato_phase)
        + 0.4 * (c["Joy"] - c["Empathic Pain"]) * u
        + 0.25 * c["Admiration"] * np.sin(np.pi * u)
    )
    pitch = np.exp(log_pitch)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    tilt = 1.8 - 1.3 * c["Determination"]
    voice = np.zeros(num_samples)
    for k in range(1, 21):
        # Harmonics above 7.8 kHz would alias at 16 kHz.
        voice += k**-tilt * np.sin(k * phase) * (k * pitch < 7800)
    voice /= np.sum(np.arange(1, 21, dtype=float) ** -tilt)

    # Syllables and laughter are single sinusoids in separate bands (<= 4.5 Hz vs >= 8 Hz) of the envelope.
    syllable_rate, syllable_phase = rng.uniform(2.5, 4.5), rng.uniform(0, 2 * np.pi)
    syllables = 0.6 + 0.4 * np.sin(2 * np.pi * syllable_rate * t + syllable_phase)
    laugh_rate = rng.uniform(8, 12)
    laughing = c["Amusement"] * burst_envelope(t, duration, rng, (0.8, 1.4), 2.5)
    envelope = (1 - laughing) * syllables + laughing * (0.5 + 0.5 * np.cos(2 * np.pi * laugh_rate * t))
    fade = 1 - 0.7 * c["Empathic Pain"] * u
    audio = rng.uniform(0.3, 0.5) * envelope * fade * voice
    audio += rng.uniform(0.003, 0.02) * rng.standard_normal(num_samples)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def noise_audio(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A corrupted audio track: loud white noise (a silent or missing track is a different case)."""
    return np.clip(rng.uniform(0.3, 0.5) * rng.standard_normal(num_samples), -1.0, 1.0).astype(np.float32)


def _random_round(value: float, rng: np.random.Generator) -> int:
    return int(np.floor(value) + (rng.random() < value - np.floor(value)))


def make_transcript(labels: np.ndarray, rng: np.random.Generator) -> str:
    """Cue words whose count grows with each intensity, mixed with fillers; sometimes empty."""
    if rng.random() < EMPTY_TRANSCRIPT_PROB:
        return ""
    words = list(rng.choice(FILLER_WORDS, int(rng.integers(3, 11))))
    for emotion, intensity in zip(EMI_EMOTIONS, labels):
        expected = max(0.0, CUES_PER_UNIT_INTENSITY * intensity + rng.normal(0.0, CUE_COUNT_NOISE))
        words += list(rng.choice(CUE_WORDS[emotion], _random_round(expected, rng)))
    rng.shuffle(words)
    return " ".join(words)


def word_salad(rng: np.random.Generator) -> str:
    """A corrupted transcript: words from every cue list and the fillers, independent of the labels."""
    vocabulary = [word for cues in CUE_WORDS.values() for word in cues] + list(FILLER_WORDS)
    return " ".join(rng.choice(vocabulary, int(rng.integers(12, 25))))


def encode_clip(path: Path, frames: np.ndarray, audio: np.ndarray) -> None:
    """Mux rgb24 frames (piped on stdin) and 16-bit PCM (a temp file) into a CBR H.264 + AAC mp4."""
    size = (frames.shape[2], frames.shape[1])
    bitrate = video_bitrate(size)
    with tempfile.TemporaryDirectory(prefix="emi-synth-") as tmp:
        pcm = Path(tmp) / "audio.s16le"
        (audio * 32767).astype("<i2").tofile(pcm)
        command = [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{size[0]}x{size[1]}",
            "-r",
            str(FPS),
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-ar",
            str(SAMPLE_RATE),
            "-ac",
            "1",
            "-i",
            str(pcm),
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            str(FPS),
            "-pix_fmt",
            "yuv420p",
            "-threads",
            "1",
            "-b:v",
            bitrate,
            "-minrate",
            bitrate,
            "-maxrate",
            bitrate,
            "-bufsize",
            bitrate,
            "-x264-params",
            "nal-hrd=cbr",
            "-c:a",
            "aac",
            "-b:a",
            AUDIO_BITRATE,
            "-fflags",
            "+bitexact",
            "-flags:v",
            "+bitexact",
            "-flags:a",
            "+bitexact",
            "-map_metadata",
            "-1",
            str(path),
        ]
        result = subprocess.run(command, input=frames.tobytes(), capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"{path}: ffmpeg failed (exit {result.returncode}): {result.stderr.decode()[-2000:]}")


def write_clip(plan: ClipPlan, seed: int, videos: Path) -> None:
    """Render and encode one clip; runs in a worker process."""
    labels = np.array(plan.labels)
    corruption_rng = clip_rng(seed, plan.index, "corruption")
    if plan.corrupted == "video":
        frames = noise_frames(plan.num_frames, corruption_rng, plan.size)
    else:
        frames = render_frames(labels, plan.num_frames, clip_rng(seed, plan.index, "video"), plan.size)
    num_samples = plan.num_frames * SAMPLE_RATE // FPS
    if plan.corrupted == "audio":
        audio = noise_audio(num_samples, corruption_rng)
    else:
        audio = render_audio(labels, num_samples, clip_rng(seed, plan.index, "audio"))
    encode_clip(videos / f"{plan.name}.mp4", frames, audio)


def _check_arguments(
    out: Path,
    clips: int,
    seed: int,
    corrupt_modality: str | None,
    corrupt_frac: float,
    workers: int,
    prefix: str,
    size: tuple[int, int],
    labels: str,
) -> None:
    if labels not in LABEL_KINDS:
        raise UsageError(f"--labels must be one of {', '.join(LABEL_KINDS)}, got {labels!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]*", prefix):
        # the name becomes the clip's file name and its WebDataset key, which ends at the first dot
        raise UsageError(f"--prefix must be letters, digits, '-' or '_', got {prefix!r}")
    if clips < 1:
        raise UsageError(f"--clips must be at least 1, got {clips}")
    if seed < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if len(size) != 2 or min(size) < 16 or any(side % 2 for side in size):  # H.264 in yuv420p needs even sides
        raise UsageError(f"--size must be two even numbers of at least 16 (WxH), got {'x'.join(map(str, size))}")
    if not 0.0 <= corrupt_frac <= 1.0:
        raise UsageError(f"--corrupt-frac must lie in [0, 1], got {corrupt_frac}")
    if corrupt_modality is not None and corrupt_modality not in MODALITIES:
        raise UsageError(f"--corrupt-modality must be one of {', '.join(MODALITIES)}, got {corrupt_modality!r}")
    if corrupt_frac > 0 and corrupt_modality is None:
        raise UsageError(f"--corrupt-frac {corrupt_frac} needs --corrupt-modality (video, audio or text)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: output folder must be new or empty (it would mix with an older dataset)")
    if shutil.which("ffmpeg") is None:
        raise UsageError("ffmpeg not found on PATH: emi synth needs it to encode the mp4 clips")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_corruption(corruption_csv: str | Path) -> tuple[set[str], set[str]]:
    """(clean clips, corrupted clips) by name, from a corruption.csv this module wrote."""
    with open(corruption_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    return {r["Filename"] for r in rows if not r["Corrupted"]}, {r["Filename"] for r in rows if r["Corrupted"]}


def synthesize(
    out: str | Path,
    clips: int,
    seed: int = 0,
    corrupt_modality: str | None = None,
    corrupt_frac: float = 0.0,
    workers: int = 1,
    prefix: str = "",
    size: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE),
    labels: str = "emi",
) -> dict:
    """Write `clips` synthetic clips of `size` (width, height) with labels of kind `labels` (LABEL_KINDS),
    transcripts and a corruption record under `out`.

    Clips are named `prefix` + their 1-based index (00001, ...); a prefix per split (train-, val-) gives every clip
    of a data set its own key, which k-fold over train + val needs (emi.data.folds).

    Returns a JSON-able summary: counts, durations, paths and the corruption applied.
    """
    out = Path(out)
    size = tuple(size)
    _check_arguments(out, clips, seed, corrupt_modality, corrupt_frac, workers, prefix, size, labels)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)

    num_corrupted = round(corrupt_frac * clips) if corrupt_modality else 0
    corrupted = set(np.random.default_rng([seed, STREAMS.index("selection")]).permutation(clips)[:num_corrupted])
    width = max(5, len(str(clips)))
    plans, transcripts = [], []
    for index in range(clips):
        intensities = draw_labels(clip_rng(seed, index, "labels"))
        corrupted_modality = corrupt_modality if index in corrupted else None
        plans.append(
            ClipPlan(
                index=index,
                name=f"{prefix}{index + 1:0{width}d}",
                labels=tuple(intensities.tolist()),
                num_frames=draw_num_frames(clip_rng(seed, index, "duration")),
                corrupted=corrupted_modality,
                size=size,
            )
        )
        if corrupted_modality == "text":
            transcripts.append(word_salad(clip_rng(seed, index, "corruption")))
        else:
            transcripts.append(make_transcript(intensities, clip_rng(seed, index, "text")))

    if workers == 1:
        for plan in plans:
            write_clip(plan, seed, videos)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, clips)) as pool:
            list(pool.map(write_clip, plans, repeat(seed), repeat(videos)))

    _write_csv(out / "labels.csv", *label_table(plans, labels))
    _write_csv(
        out / "transcripts.csv", ["Filename", "Text"], [[plan.name, text] for plan, text in zip(plans, transcripts)]
    )
    _write_csv(out / "corruption.csv", ["Filename", "Corrupted"], [[plan.name, plan.corrupted or ""] for plan in plans])
    durations = [plan.num_frames / FPS for plan in plans]
    return {
        "out": str(out),
        "videos": str(videos),
        "labels": str(out / "labels.csv"),
        "label_kind": labels,
        "transcripts": str(out / "transcripts.csv"),
        "corruption": str(out / "corruption.csv"),
        "clips": clips,
        "seed": seed,
        "total_duration_s": round(sum(durations), 2),
        "min_duration_s": min(durations),
        "max_duration_s": max(durations),
        "fps": FPS,
        "frame_size": min(size),  # the short side, as `emi shards build --frame-size` counts it
        "size": f"{size[0]}x{size[1]}",
        "sample_rate": SAMPLE_RATE,
        "empty_transcripts": sum(1 for text in transcripts if not text),
        "corrupt_modality": corrupt_modality,
        "corrupt_frac": corrupt_frac,
        "corrupted_clips": num_corrupted,
    }
