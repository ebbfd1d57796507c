"""One clip to one WebDataset sample, in a worker: decode, crop the face, transcribe, encode to bytes.

Workers hand back encoded bytes (JPEGs, WAV, JSON), a few hundred KB per clip, never decoded arrays.
A sample holds exactly `<key>.json`, `<key>.txt`, `<key>.wav` and `<key>.0000.jpg`, `<key>.0001.jpg`, ...
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from emi.media import DecodedClip, MediaError, decode_clips, output_size, wav_bytes
from emi.shards.asr import WhisperTranscriber
from emi.shards.face import find_face_box, load_face_detector
from emi.shards.plan import ClipJob, Failure

JPEG_QUALITY = 90


@dataclass(frozen=True)
class SampleOptions:
    split: str
    fps: float
    sample_rate: int
    frame_size: int
    asr_model: str | None  # Whisper name or path, None: no recognition
    face_crop: bool


@dataclass(frozen=True)
class Sample:
    key: str
    members: list[tuple[str, bytes]]  # (tar member name, bytes) in tar order
    num_frames: int
    duration_s: float


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class SampleBuilder:
    """Builds samples with the models a worker loads once: the Whisper model and the face detector."""

    def __init__(self, options: SampleOptions):
        self.options = options
        self.transcriber = WhisperTranscriber(options.asr_model) if options.asr_model else None
        self.face_detector = load_face_detector() if options.face_crop else None

    def _images(self, frames: np.ndarray) -> tuple[list[Image.Image], dict]:
        """Frames as images of the output size; with face cropping, decoded frames are at source size."""
        images = [Image.fromarray(frame) for frame in frames]
        if self.face_detector is None:
            return images, {"method": "none"}
        size = self.options.frame_size
        box, with_face, checked = find_face_box(frames, self.face_detector)
        if box is None:  # no face anywhere: keep the whole frame, resized like an uncropped clip
            full_size = output_size(images[0].width, images[0].height, size)
            return ([image.resize(full_size, Image.Resampling.BICUBIC) for image in images],
                    {"method": "opencv", "found": False, "frames_checked": checked})
        x, y, w, h = box
        crops = [image.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + w, y + h)) for image in images]
        return crops, {"method": "opencv", "found": True, "box": box, "frames_with_face": with_face,
                       "frames_checked": checked}

    def __call__(self, job: ClipJob) -> Sample | Failure:
        return self.build_many([job])[0]

    def build_many(self, jobs: list[ClipJob]) -> list[Sample | Failure]:
        """Samples of several clips, whose videos one ffmpeg process decodes (see emi.media.decode_clips)."""
        options = self.options
        clips = decode_clips([job.path for job in jobs], fps=options.fps, sample_rate=options.sample_rate,
                             frame_size=None if options.face_crop else options.frame_size)
        return [self._sample(job, clip) for job, clip in zip(jobs, clips)]

    def _sample(self, job: ClipJob, clip: DecodedClip | MediaError) -> Sample | Failure:
        options = self.options
        if isinstance(clip, MediaError):
            return Failure(path=job.source, reason=clip.reason, key=job.key)
        if not clip.has_video:
            return Failure(path=job.source, reason="no video stream (an audio-only file has no frames)", key=job.key)
        images, face_crop = self._images(clip.frames)
        if job.transcript is not None:
            transcript = job.transcript
        elif self.transcriber is not None and clip.has_audio:
            transcript = self.transcriber(clip.audio, clip.sample_rate)
        else:
            transcript = ""
        meta = {
            "key": job.key, "source": job.source, "split": options.split, "fps": options.fps,
            "num_frames": len(images), "duration_s": clip.duration_s, "sample_rate": clip.sample_rate,
            "has_audio": clip.has_audio, "labels": job.labels, "transcript": transcript, "face_crop": face_crop,
        }
        members = [
            (f"{job.key}.json", json.dumps(meta, ensure_ascii=False).encode()),
            (f"{job.key}.txt", transcript.encode()),
            (f"{job.key}.wav", wav_bytes(clip.audio, clip.sample_rate)),
        ]
        members += [(f"{job.key}.{index:04d}.jpg", _jpeg(image)) for index, image in enumerate(images)]
        return Sample(key=job.key, members=members, num_frames=len(images), duration_s=clip.duration_s)


_WORKER_BUILDER: SampleBuilder | None = None


def init_worker(options: SampleOptions) -> None:
    """Pool initializer: load the models once per worker process."""
    global _WORKER_BUILDER
    _WORKER_BUILDER = SampleBuilder(options)


def build_in_worker(jobs: list[ClipJob]) -> list[Sample | Failure]:
    return _WORKER_BUILDER.build_many(jobs)
