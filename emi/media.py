"""Decoding media in this process with FFmpeg's libraries (PyAV): frames at a fixed rate and mono audio at a fixed
rate, streamed, so that memory does not grow with a clip's length.

This is the one decode path for building shards and for `emi predict`, so training and serving see the same
pixels and samples. Rules, shared by both:
- only local, self-contained media files are opened: the demuxers in DEMUXERS, the `file` protocol, nothing a
  file could name (playlists, concat scripts, manifests and other formats that refer to further files or URLs
  are refused with the reason);
- duration_s is the container's duration (0 for a still image);
- num_frames = max(1, floor(duration_s * fps + 0.5)), sampled by FFmpeg's fps filter from timestamps that start
  at 0 (as the ffmpeg command line does); if the video stream ends early the last frame is repeated up to
  num_frames, unless the file is damaged: decode errors with frames missing, or streams that all end more than
  TRUNCATION_TOLERANCE before the length the file declares (a cut file), are MediaErrors;
- frames are RGB, short side resized to frame_size (bicubic), long side to the nearest even size keeping the
  displayed aspect (rotation and non-square pixels applied);
- audio is mono 16-bit at sample_rate, padded with silence or cut to round(duration_s * sample_rate) samples;
  a clip with no audio stream gets that many zeros and has_audio False.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import av.logging
import numpy as np

# Demuxers of self-contained media files. Not here, on purpose: hls, dash, concat, image2 (file name patterns),
# imf, sdp/rtp/rtsp, tee and every other format that opens further files or URLs, and text renderers (tty).
DEMUXERS = (
    "mov",
    "matroska",
    "avi",
    "mpeg",
    "mpegts",
    "mpegvideo",
    "m4v",
    "h264",
    "hevc",
    "flv",
    "asf",
    "ogg",
    "nut",
    "dv",
    "gif",
    "wav",
    "w64",
    "mp3",
    "aac",
    "flac",
    "ac3",
    "eac3",
    "amr",
    "aiff",
    "caf",
    "au",
    "wv",
    "png_pipe",
    "jpeg_pipe",
    "bmp_pipe",
    "webp_pipe",
    "tiff_pipe",
)
IMAGE_DEMUXERS = {"png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe"}  # one picture: a one-frame clip
_OPEN_OPTIONS = {"format_whitelist": ",".join(DEMUXERS), "protocol_whitelist": "file"}
# Text formats that name other files or URLs, by how they start, for the refusal message.
_REFERRING_TEXT = (
    ("#EXTM3U", "an HLS playlist"),
    ("ffconcat", "an FFmpeg concat script"),
    ("file ", "an FFmpeg concat script"),
    ("<?xml", "an XML manifest (DASH, IMF or similar)"),
    ("<MPD", "a DASH manifest"),
    ("v=0", "an SDP session description"),
    ("[playlist]", "a PLS playlist"),
    ("<asx", "an ASX playlist"),
)
# A file whose streams all end before its declared length by more than this is cut, not a shorter clip.
TRUNCATION_TOLERANCE = (0.5, 0.01)  # seconds + fraction of the declared length
SCALE_FLAGS = "bicubic"


class MediaError(Exception):
    """A media file that cannot be decoded; `reason` says why in words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    format_name: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int  # displayed size: after rotation and sample aspect ratio; 0 without video
    height: int
    is_image: bool


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


def _url(path: Path) -> str:
    # An absolute file: URL, so names starting with '-' or holding ':' are never read as protocols.
    return "file:" + str(path.resolve())


def _text_head(path: Path) -> str | None:
    """The first KB of the file if it is text, else None."""
    with path.open("rb") as file:
        head = file.read(1024)
    try:
        text = head.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark starts many a text file
    except UnicodeDecodeError:
        return None
    return text if all(ch.isprintable() or ch in "\r\n\t" for ch in text) else None


def _unopenable(path: Path) -> str:
    """Why FFmpeg would not open a file (allowed demuxers only): what it refers to, or FFmpeg's own words."""
    head = _text_head(path)
    if head is not None:
        start = head.lstrip(" \r\n\t")
        for prefix, what in _REFERRING_TEXT:
            if start[: len(prefix)].lower() == prefix.lower():
                return f"refused: {what}, which refers to other files or URLs (only self-contained media is read)"
        return "not a media file (it is a text file)"
    skip_repeated = av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # else the same message about a second file is dropped
    try:
        with av.logging.Capture() as logs:
            try:
                av.open(_url(path), options=dict(_OPEN_OPTIONS)).close()
            except av.FFmpegError as err:
                logs.append((0, "", err.strerror or str(err)))
    finally:
        av.logging.set_level(None)
        av.logging.set_skip_repeated(skip_repeated)
    messages = list(dict.fromkeys(message.strip() for _, _, message in logs if message.strip()))
    return (
        f"not readable as media: truncated, corrupt or not an accepted format "
        f"(FFmpeg: {'; '.join(messages[:3]) or 'no message'})"
    )


def _open(path: Path) -> av.container.InputContainer:
    if path.is_dir():
        raise MediaError(path, "is a directory, not a media file")
    if not path.exists():
        raise MediaError(path, "file not found")
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        return av.open(_url(path), options=dict(_OPEN_OPTIONS))
    except av.FFmpegError:
        raise MediaError(path, _unopenable(path)) from None


def _video_stream(container) -> av.video.stream.VideoStream | None:
    """The first video stream that is not cover art."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _rotation_filters(rotation: int) -> list[tuple[str, str]]:
    """The filters that show a frame upright: FFmpeg's display rotation is counter-clockwise degrees."""
    rotation %= 360
    if rotation == 90:
        return [("transpose", "cclock")]
    if rotation == 270:
        return [("transpose", "clock")]
    if rotation == 180:
        return [("hflip", ""), ("vflip", "")]
    return []


def _seconds(value: int | None, time_base) -> float | None:
    return None if value is None else float(value * time_base)


class ClipStream:
    """One open media file decoded as a stream: iterate for ("frame", av.VideoFrame) and ("audio", bytes) in file
    order.

    Frames are in `pixel_format` (rgb24 or gray) at `fps`, exactly `num_frames` of them (a repeated last frame is
    the same object again; `as_array` gives a frame's pixels); audio is s16le mono PCM at `sample_rate`, exactly
    `num_samples` samples in all. crop (x, y, w, h) in displayed pixels is cut out before scaling to frame_size
    (then the short side of the crop); shrink_only keeps frames whose short side is already at most frame_size
    at their size. `size` and `source_size` are known once the first frame is out. A
    MediaError can come at any point of the iteration; what came before it is then not the clip. threads: the
    video decoder's (0: FFmpeg's choice)."""

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 5.0,
        sample_rate: int = 16000,
        frame_size: int | None = 256,
        crop: tuple[int, int, int, int] | None = None,
        pixel_format: str = "rgb24",
        with_audio: bool = True,
        shrink_only: bool = False,
        threads: int = 0,
    ):
        if fps <= 0 or sample_rate <= 0:
            raise ValueError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
        self.path, self.fps, self.sample_rate = Path(path), fps, sample_rate
        self.frame_size, self.crop, self.pixel_format = frame_size, crop, pixel_format
        self.shrink_only, self.threads = shrink_only, threads
        self.container = _open(self.path)
        try:
            self._describe(with_audio)
        except BaseException:
            self.container.close()
            raise
        self.size: tuple[int, int] | None = None  # output (width, height)
        self.source_size: tuple[int, int] = (0, 0)  # displayed (width, height)
        self.has_audio = False  # audio samples decoded

    def _describe(self, with_audio: bool) -> None:
        container, path = self.container, self.path
        self.video = _video_stream(container)
        self.audio = container.streams.audio[0] if container.streams.audio else None
        if self.video is None and self.audio is None:
            raise MediaError(path, "no video and no audio stream")
        self.format_name = container.format.name
        self.is_image = (
            self.video is not None and self.audio is None and bool(set(self.format_name.split(",")) & IMAGE_DEMUXERS)
        )
        durations = [container.duration / 1e6 if container.duration is not None else None]
        durations += [_seconds(s.duration, s.time_base) for s in (self.video, self.audio) if s is not None]
        known = [d for d in durations if d is not None]
        if self.is_image:
            self.duration_s = 0.0
        elif not known:
            raise MediaError(path, "unknown duration (the file declares none)")
        else:
            self.duration_s = known[0]
        # What the file says its length is. An AVI header counts the video frames; FFmpeg's duration of a cut
        # AVI is what is left of it, so the count is the declaration. (Not for mp4: its edit lists cut frames.)
        self.declared_s = self.duration_s
        if (
            self.video is not None
            and "avi" in self.format_name.split(",")
            and self.video.frames
            and self.video.average_rate
        ):
            self.declared_s = max(self.declared_s, float(self.video.frames / self.video.average_rate))
        self.start_s = container.start_time / 1e6 if container.start_time is not None else 0.0
        self.num_frames = num_frames_for(self.duration_s, self.fps) if self.video is not None else 0
        self.num_samples = num_samples_for(self.duration_s, self.sample_rate)
        self.decode_audio = with_audio and self.audio is not None and self.num_samples > 0
        if self.video is not None:  # threads 0: FFmpeg's choice (one per core); 1 where workers share the cores
            self.video.thread_type = "AUTO" if self.threads != 1 else "SLICE"
            self.video.codec_context.thread_count = self.threads

    @property
    def info(self) -> MediaInfo:
        return MediaInfo(
            path=self.path,
            format_name=self.format_name,
            duration_s=self.duration_s,
            has_video=self.video is not None,
            has_audio=self.audio is not None,
            width=self.source_size[0],
            height=self.source_size[1],
            is_image=self.is_image,
        )

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> ClipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _graph(self, frame: av.VideoFrame) -> av.filter.Graph:
        """fps -> square pixels -> upright -> crop -> scale -> pixel format, set up from the first frame."""
        filters = [] if self.is_image else [("fps", f"{self.fps}")]
        width, height = frame.width, frame.height
        sar = self.video.sample_aspect_ratio or self.video.codec_context.sample_aspect_ratio
        if sar and sar > 0 and sar != 1:
            width = max(2, round(width * sar))
            filters += [("scale", f"{width}:{height}:flags={SCALE_FLAGS}"), ("setsar", "1")]
        upright = _rotation_filters(round(frame.rotation or 0))
        filters += upright
        if upright and upright[0][0] == "transpose":
            width, height = height, width
        self.source_size = (width, height)
        if self.crop is not None:
            x, y, w, h = self.crop
            filters.append(("crop", f"{w}:{h}:{x}:{y}"))
            width, height = w, h
        keep = self.frame_size is None or (self.shrink_only and min(width, height) <= self.frame_size)
        self.size = output_size(width, height, None if keep else self.frame_size)
        size = f"{self.size[0]}:{self.size[1]}"
        if self.pixel_format == "gray":
            filters += [("scale", f"{size}:flags={SCALE_FLAGS}"), ("format", "gray")]
        else:  # scale in YUV, then convert unscaled: swscale's fast path, a third of the CPU of doing both at once
            filters += [
                ("scale", f"{size}:flags={SCALE_FLAGS}"),
                ("format", "yuv420p"),
                ("scale", size),
                ("format", self.pixel_format),
            ]
        graph = av.filter.Graph()
        previous = graph.add_buffer(template=self.video)
        for name, args in filters:
            node = graph.add(name, args)
            previous.link_to(node)
            previous = node
        previous.link_to(graph.add("buffersink"))
        graph.configure()
        return graph

    def __iter__(self) -> Iterator[tuple[str, av.VideoFrame | bytes]]:
        decoding = _Decoding(self)
        yield from decoding.decode()
        decoding.check_complete()
        for _ in range(decoding.emitted, self.num_frames):  # the video stream ends before the container: hold the last
            yield "frame", decoding.last
        self.has_audio = decoding.samples > 0
        if decoding.samples < self.num_samples:
            yield "audio", bytes(2 * (self.num_samples - decoding.samples))


class _Decoding:
    """One pass over a ClipStream's packets: video frames through its filter graph (built from the first frame),
    audio through a resampler, with what came out so far, where the content ended and the decoder's errors."""

    def __init__(self, clip: ClipStream) -> None:
        self.clip = clip
        self.streams = [s for s in (clip.video, clip.audio if clip.decode_audio else None) if s is not None]
        self.resampler = (
            av.AudioResampler(format="s16", layout="mono", rate=clip.sample_rate) if clip.decode_audio else None
        )
        self.start = {s.index: round(clip.start_s / s.time_base) for s in self.streams if s.time_base}
        self.graph: av.filter.Graph | None = None
        self.last: av.VideoFrame | None = None
        self.emitted = self.samples = 0
        self.content_end = 0.0
        self.errors: list[str] = []

    def decode(self) -> Iterator[tuple[str, av.VideoFrame | bytes]]:
        try:
            for packet in self.clip.container.demux(*self.streams) if self.streams else ():
                try:
                    decoded = packet.decode()
                except av.FFmpegError as err:
                    self.errors.append(err.strerror or str(err))
                    continue
                for frame in decoded:
                    yield from self._frame(frame, packet.stream.index)
        except av.FFmpegError as err:  # the demuxer gave up: the file is damaged from here on
            self.errors.append(err.strerror or str(err))
        if self.graph is not None:
            self.graph.vpush(None)
            yield from self._pull()
        if self.resampler is not None:
            yield from self._pcm(self.resampler.resample(None))

    def _frame(self, frame: av.VideoFrame | av.AudioFrame, stream: int) -> Iterator[tuple[str, av.VideoFrame | bytes]]:
        audio = isinstance(frame, av.AudioFrame)
        if frame.time is not None:
            if audio:
                length = frame.samples / frame.sample_rate
            else:
                length = _seconds(frame.duration, frame.time_base) or 1 / float(
                    self.clip.video.average_rate or self.clip.fps
                )
            self.content_end = max(self.content_end, frame.time + length - self.clip.start_s)
        if audio:
            yield from self._pcm(self.resampler.resample(frame))
            return
        if self.graph is None:
            self.graph = self.clip._graph(frame)
        if frame.pts is not None:
            frame.pts -= self.start.get(stream, 0)
        self.graph.vpush(frame)
        yield from self._pull()

    def _pull(self) -> Iterator[tuple[str, av.VideoFrame]]:
        while True:
            try:
                out = self.graph.vpull()
            except (av.BlockingIOError, av.EOFError):
                return
            if self.emitted < self.clip.num_frames:
                self.last, self.emitted = out, self.emitted + 1
                yield "frame", out

    def _pcm(self, frames: list[av.AudioFrame]) -> Iterator[tuple[str, bytes]]:
        for frame in frames:  # the plane may be padded beyond its samples; to_ndarray is slow per frame
            data = bytes(frame.planes[0])[: 2 * min(frame.samples, self.clip.num_samples - self.samples)]
            if data:
                self.samples += len(data) // 2
                yield "audio", data

    def check_complete(self) -> None:
        """A MediaError where the video or the streams stopped short of what the file declares."""
        clip, emitted = self.clip, self.emitted
        message = "; ".join(dict.fromkeys(self.errors[:3])) or "no message"
        if clip.video is not None and emitted == 0:
            raise MediaError(clip.path, f"truncated or corrupt: no decodable video frames ({message})")
        if clip.video is not None and emitted < clip.num_frames and self.errors:
            raise MediaError(
                clip.path, f"truncated or corrupt: decoded {emitted} of {clip.num_frames} frames ({message})"
            )
        seconds, fraction = TRUNCATION_TOLERANCE
        if (
            self.streams
            and not clip.is_image
            and clip.declared_s - self.content_end > seconds + fraction * clip.declared_s
        ):
            raise MediaError(
                clip.path,
                f"truncated: its streams end at {self.content_end:.2f} s, the file declares {clip.declared_s:.2f} s",
            )


def as_array(frame: av.VideoFrame) -> np.ndarray:
    """A frame's pixels: [H, W, 3] uint8 for rgb24, [H, W] for gray."""
    return frame.to_ndarray()


def probe(path: str | os.PathLike) -> MediaInfo:
    """Streams, duration and displayed size of a media file (its first frame is decoded for the rotation);
    MediaError if it is not usable media."""
    with ClipStream(path, frame_size=None, with_audio=False) as stream:
        for kind, _ in stream:
            if kind == "frame":
                break
        return stream.info


def decode_clip(
    path: str | os.PathLike, fps: float = 5.0, sample_rate: int = 16000, frame_size: int | None = 256
) -> DecodedClip:
    """The whole clip in memory (see the module rules): for short clips and tests; the shard builder and predict
    stream with ClipStream instead. An audio-only file gives zero frames and has_video False."""
    frames, pcm = [], []
    with ClipStream(path, fps, sample_rate, frame_size) as stream:
        for kind, data in stream:
            if kind == "frame":
                frames.append(as_array(data))
            else:
                pcm.append(data)
        audio = np.frombuffer(b"".join(pcm), "<i2").astype(np.float32) / 32768.0
        return DecodedClip(
            frames=np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8),
            audio=audio,
            sample_rate=sample_rate,
            fps=fps,
            duration_s=stream.duration_s,
            has_audio=stream.has_audio,
            has_video=stream.video is not None,
            source_size=stream.source_size,
        )


def wav_header(num_samples: int, sample_rate: int) -> bytes:
    """The 44-byte header of a 16-bit PCM mono WAV file holding num_samples samples (as the wave module writes)."""
    data = 2 * num_samples
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM mono WAV file holding `waveform` (float in [-1, 1])."""
    pcm = np.round(np.clip(np.asarray(waveform, np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    buffer.write(wav_header(pcm.size, sample_rate))
    buffer.write(pcm.tobytes())
    return buffer.getvalue()
