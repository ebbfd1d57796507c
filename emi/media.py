"""Decoding media with ffmpeg: frames at a fixed rate and mono audio at a fixed rate, several clips per process.

This is the one decode path for building shards and for `emi predict`, so training and serving see the same
pixels and samples. Rules, shared by both:
- duration_s is the container's duration (0 for a still image);
- num_frames = max(1, floor(duration_s * fps + 0.5)), sampled by ffmpeg's fps filter; if the video stream
  ends early without decode errors the last frame is repeated up to num_frames;
- frames are RGB, short side resized to frame_size, long side to the nearest even size keeping the
  displayed aspect (rotation and non-square pixels applied);
- audio is mono at sample_rate, padded with silence or cut to round(duration_s * sample_rate) samples;
  a clip with no audio stream gets that many zeros and has_audio False.
"""
from __future__ import annotations

import io
import math
import os
import subprocess
import threading
import wave
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

# Demuxers that hold exactly one picture: such a file is a one-frame clip of duration 0.
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe"}
_FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"]


class MediaError(Exception):
    """A media file that cannot be decoded; `reason` says why in words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    duration_s: float
    video_stream: int | None  # ffprobe stream index, None without video
    audio_stream: int | None
    width: int  # displayed size: after rotation and sample aspect ratio; 0 without video
    height: int
    is_image: bool

    @property
    def has_video(self) -> bool:
        return self.video_stream is not None

    @property
    def has_audio(self) -> bool:
        return self.audio_stream is not None


@dataclass
class DecodedClip:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB; T == 0 without video
    audio: np.ndarray  # [S] float32 in [-1, 1], mono
    sample_rate: int
    fps: float
    duration_s: float
    has_audio: bool
    has_video: bool
    source_size: tuple[int, int]  # displayed (width, height) of the source video, (0, 0) without video


def num_frames_for(duration_s: float, fps: float) -> int:
    """Frames sampled from a clip: duration * fps rounded half up, at least one (a still image)."""
    return max(1, math.floor(duration_s * fps + 0.5))


def num_samples_for(duration_s: float, sample_rate: int) -> int:
    return math.floor(duration_s * sample_rate + 0.5)


def _ffmpeg_url(path: Path) -> str:
    # An absolute file: URL so names starting with '-' or containing ':' are never read as options or protocols.
    return "file:" + str(path.resolve())


def _ffmpeg_message(stderr: bytes, path: Path) -> str:
    """ffmpeg's error lines without the '[demuxer @ 0x...]' and file name prefixes, joined on one line."""
    lines = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip().removeprefix(_ffmpeg_url(path) + ": ")
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[:4]) or "no message"


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as file:
        head = file.read(1024)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _displayed_size(stream: dict) -> tuple[int, int]:
    width, height = int(stream["width"]), int(stream["height"])
    num, _, den = stream.get("sample_aspect_ratio", "1:1").partition(":")
    if num.isdigit() and den.isdigit() and int(num) > 0 and int(den) > 0:
        width = round(width * int(num) / int(den))
    rotation = stream.get("tags", {}).get("rotate")
    for side_data in stream.get("side_data_list", []):
        rotation = side_data.get("rotation", rotation)
    if rotation is not None and abs(int(float(rotation))) % 180 == 90:
        width, height = height, width
    return width, height


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, duration and displayed size of a media file; MediaError if it is not usable media."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        info = ffmpeg.probe(_ffmpeg_url(path), v="error")
    except ffmpeg.Error as err:
        if _looks_like_text(path):
            raise MediaError(path, "not a media file (it is a text file)") from None
        raise MediaError(path, f"not readable as media, truncated or corrupt (ffprobe: "
                               f"{_ffmpeg_message(err.stderr, path)})") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)  # cover art is not video
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None and audio is None:
        raise MediaError(path, "no video and no audio stream")
    fmt = info.get("format", {})
    if fmt.get("format_name") == "tty":  # ffmpeg renders .txt files as video
        raise MediaError(path, "not a media file (it is a text file)")
    is_image = video is not None and audio is None and fmt.get("format_name") in _IMAGE_FORMATS
    if is_image:
        duration = 0.0
    else:
        durations = [fmt.get("duration")] + [s.get("duration") for s in (video, audio) if s is not None]
        known = [float(d) for d in durations if d not in (None, "N/A")]
        if not known:
            raise MediaError(path, "unknown duration (ffprobe reports none)")
        duration = known[0]
    width, height = _displayed_size(video) if video is not None else (0, 0)
    if video is not None and (width <= 0 or height <= 0):
        raise MediaError(path, f"video stream has no frame size ({width}x{height})")
    return MediaInfo(path=path, duration_s=duration, video_stream=video["index"] if video else None,
                     audio_stream=audio["index"] if audio else None, width=width, height=height,
                     is_image=is_image)


def output_size(width: int, height: int, frame_size: int | None) -> tuple[int, int]:
    """(width, height) with the short side == frame_size and the long side the nearest even size.

    frame_size None keeps the source size (rounded down to even, as yuv420 encoders require)."""
    if frame_size is None:
        return max(2, width - width % 2), max(2, height - height % 2)
    if frame_size < 2 or frame_size % 2:
        raise ValueError(f"frame_size must be an even number >= 2, got {frame_size}")
    short, long = min(width, height), max(width, height)
    long_out = max(frame_size, 2 * round(long * frame_size / short / 2))
    return (frame_size, long_out) if width <= height else (long_out, frame_size)


@dataclass(frozen=True)
class _VideoPlan:
    """One clip's part of an ffmpeg run: its streams and what to take from them."""

    info: MediaInfo
    num_frames: int
    num_samples: int
    width: int  # output frame size
    height: int

    @property
    def decodes_audio(self) -> bool:
        return self.info.has_audio and self.num_samples > 0


def _plan(info: MediaInfo, fps: float, sample_rate: int, frame_size: int | None) -> _VideoPlan:
    width, height = output_size(info.width, info.height, frame_size)
    return _VideoPlan(info=info, num_frames=num_frames_for(info.duration_s, fps),
                      num_samples=num_samples_for(info.duration_s, sample_rate), width=width, height=height)


def _run_ffmpeg(plans: list[_VideoPlan], fps: float, sample_rate: int) -> tuple[list[tuple[bytes, bytes]], bytes, int]:
    """One ffmpeg process decoding every plan's clip, each output to its own pipe: per clip (rgb24 frames,
    s16le audio), then stderr and the exit code.

    A thread per pipe drains it while communicate() drains stderr, so no pipe fills up and stalls ffmpeg."""
    outputs, pipes = [], []
    for plan in plans:
        source = ffmpeg.input(_ffmpeg_url(plan.info.path))
        video = source[str(plan.info.video_stream)]
        if not plan.info.is_image:
            video = video.filter("fps", fps=fps)
        pipes.append(os.pipe())
        outputs.append(video.filter("scale", plan.width, plan.height).output(
            f"pipe:{pipes[-1][1]}", format="rawvideo", pix_fmt="rgb24", vframes=plan.num_frames))
        if plan.decodes_audio:
            pipes.append(os.pipe())
            outputs.append(source[str(plan.info.audio_stream)].output(
                f"pipe:{pipes[-1][1]}", format="s16le", acodec="pcm_s16le", ac=1, ar=sample_rate))
    args = ffmpeg.merge_outputs(*outputs).compile(cmd=_FFMPEG)
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, pass_fds=[write for _, write in pipes])
    except BaseException:
        for read, _ in pipes:
            os.close(read)
        raise
    finally:
        for _, write in pipes:
            os.close(write)
    received: list[bytes] = [b""] * len(pipes)

    def drain(index: int) -> None:
        with os.fdopen(pipes[index][0], "rb") as pipe:
            received[index] = pipe.read()

    readers = [threading.Thread(target=drain, args=(index,), daemon=True) for index in range(len(pipes))]
    for reader in readers:
        reader.start()
    _, stderr = process.communicate()
    for reader in readers:
        reader.join()
    streams = iter(received)
    return [(next(streams), next(streams) if plan.decodes_audio else b"") for plan in plans], stderr, process.returncode


def _decoded(plan: _VideoPlan, raw_video: bytes, pcm: bytes, stderr: bytes, returncode: int, fps: float,
             sample_rate: int) -> DecodedClip:
    """The clip from its share of an ffmpeg run's output; MediaError by the module's rules for missing frames."""
    info = plan.info
    message = _ffmpeg_message(stderr, info.path)
    if returncode != 0:
        raise MediaError(info.path, f"truncated or corrupt: ffmpeg failed ({message})")
    frame_bytes = plan.width * plan.height * 3
    decoded = len(raw_video) // frame_bytes
    if decoded == 0:
        raise MediaError(info.path, f"truncated or corrupt: no decodable video frames ({message})")
    if decoded < plan.num_frames and stderr.strip():
        raise MediaError(info.path, f"truncated or corrupt: decoded {decoded} of {plan.num_frames} frames "
                                    f"({message})")
    frames = np.frombuffer(raw_video, np.uint8, decoded * frame_bytes).reshape(decoded, plan.height, plan.width, 3)
    if decoded < plan.num_frames:  # the video stream ends cleanly before the container: hold the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], plan.num_frames - decoded, axis=0)])

    audio = np.frombuffer(pcm, np.int16, len(pcm) // 2).astype(np.float32) / 32768.0
    return DecodedClip(frames=frames, audio=_fit_length(audio, plan.num_samples), sample_rate=sample_rate, fps=fps,
                       duration_s=info.duration_s, has_audio=audio.size > 0, has_video=True,
                       source_size=(info.width, info.height))


def _decode_videos(plans: list[_VideoPlan], fps: float, sample_rate: int) -> list[DecodedClip | MediaError]:
    """Clips with video from one ffmpeg process. ffmpeg's messages cannot be told apart by clip, so when a
    shared run reports anything, each clip is decoded again in a process of its own for its own verdict."""
    outputs, stderr, returncode = _run_ffmpeg(plans, fps, sample_rate)
    if len(plans) > 1 and (returncode != 0 or stderr.strip()):
        return [result for plan in plans for result in _decode_videos([plan], fps, sample_rate)]
    results: list[DecodedClip | MediaError] = []
    for plan, (raw_video, pcm) in zip(plans, outputs):
        try:
            results.append(_decoded(plan, raw_video, pcm, stderr, returncode, fps, sample_rate))
        except MediaError as err:
            results.append(err)
    return results


def decode_clips(paths: list[str | os.PathLike], fps: float = 5.0, sample_rate: int = 16000,
                 frame_size: int | None = 256) -> list[DecodedClip | MediaError]:
    """`decode_clip` of each path (a MediaError in the place of a clip that cannot be decoded), with ONE ffmpeg
    process decoding all their videos: a process start-up costs as much CPU as decoding a short clip."""
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
    results: list[DecodedClip | MediaError | None] = [None] * len(paths)
    plans: dict[int, _VideoPlan] = {}
    for index, path in enumerate(paths):
        try:
            info = probe(path)
            if info.has_video:
                plans[index] = _plan(info, fps, sample_rate, frame_size)
                continue
            audio, has_audio = _load_audio(info, sample_rate)
            results[index] = DecodedClip(frames=np.zeros((0, 0, 0, 3), np.uint8), audio=audio,
                                         sample_rate=sample_rate, fps=fps, duration_s=info.duration_s,
                                         has_audio=has_audio, has_video=False, source_size=(0, 0))
        except MediaError as err:
            results[index] = err
    if plans:
        for index, result in zip(plans, _decode_videos(list(plans.values()), fps, sample_rate)):
            results[index] = result
    return results


def decode_clip(path: str | os.PathLike, fps: float = 5.0, sample_rate: int = 16000,
                frame_size: int | None = 256) -> DecodedClip:
    """Frames at `fps` and mono audio at `sample_rate` from one ffmpeg process (see the module rules).

    An audio-only file gives zero frames and has_video False; the caller decides whether that is an error.
    frame_size None keeps the source size. MediaError if the file cannot be decoded."""
    (result,) = decode_clips([path], fps, sample_rate, frame_size)
    if isinstance(result, MediaError):
        raise result
    return result


def _fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    if audio.size >= num_samples:
        return audio[:num_samples]
    return np.concatenate([audio, np.zeros(num_samples - audio.size, np.float32)])


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> tuple[np.ndarray, bool]:
    """Mono float32 waveform at `sample_rate` via torchaudio, round(duration * rate) samples long.

    A file without an audio stream gives silence of that length and has_audio False."""
    return _load_audio(probe(path), sample_rate)


def _load_audio(info: MediaInfo, sample_rate: int) -> tuple[np.ndarray, bool]:
    num_samples = num_samples_for(info.duration_s, sample_rate)
    if not info.has_audio:
        return np.zeros(num_samples, np.float32), False
    import torchaudio  # imported here: torch is heavy and only audio-only inputs need it

    try:
        waveform, source_rate = torchaudio.load(str(info.path))
    except RuntimeError as err:
        raise MediaError(info.path, f"truncated or corrupt audio: {err}") from None
    mono = waveform.mean(dim=0)
    if source_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, source_rate, sample_rate)
    audio = mono.clamp(-1.0, 1.0).numpy().astype(np.float32, copy=False)
    return _fit_length(audio, num_samples), audio.size > 0


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM mono WAV file holding `waveform` (float in [-1, 1]).

    Written with the standard wave module: torchaudio.save (through torchcodec) cannot write 16-bit PCM
    to an in-memory buffer, and this keeps torch out of the shard workers."""
    pcm = np.round(np.clip(np.asarray(waveform, np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()
