"""One clip to one WebDataset sample, in a worker: decode, crop the face, transcribe, encode, write.

The clip is streamed (emi.media.ClipStream): each frame is JPEG-encoded as it is decoded and written as a tar
member to the clip's part file, the audio goes to a temporary file, so a worker holds a few frames whatever the
clip's length. The part file holds exactly `<key>.0000.jpg`, `<key>.0001.jpg`, ..., then `<key>.wav`, `<key>.txt`
and `<key>.json` (the json last: it counts what came before); the parent appends it to the shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import av
import numpy as np
from PIL import Image

from emi import storage
from emi.media import ClipStream, MediaError, as_array, wav_header
from emi.shards.asr import WhisperTranscriber
from emi.shards.face import DETECT_FRAMES, DETECT_SHORT_SIDE, face_box, largest_face, load_face_detector
from emi.shards.files import tar_header, tar_member, tar_padding
from emi.shards.plan import ClipJob, Failure, SampleOptions

JPEG_QUALITY = 90
AUDIO_BLOCK = 1 << 20  # bytes of PCM copied at a time from the temporary file into the part


@dataclass(frozen=True)
class Sample:
    key: str
    part: Path  # the sample's tar members, ready to append to a shard
    num_frames: int
    duration_s: float


def _jpeg(frame: av.VideoFrame) -> bytes:
    """An rgb24 frame as a JPEG, read straight from its (possibly padded) plane."""
    plane = frame.planes[0]
    image = Image.frombuffer("RGB", (frame.width, frame.height), plane, "raw", "RGB", plane.line_size, 1)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class SampleBuilder:
    """Builds samples into part files in `parts`, with the models a worker loads once: Whisper, the face detector."""

    def __init__(self, options: SampleOptions, parts: Path):
        self.options = options
        self.parts = Path(parts)
        self.transcriber = WhisperTranscriber(options.asr_model) if options.asr_model else None
        self.face_detector = load_face_detector() if options.face_crop else None

    def __call__(self, job: ClipJob) -> Sample | Failure:
        part = self.parts / f"{job.key}.part"
        local = self.parts / f"{job.key}-source{PurePosixPath(job.path).suffix}" if storage.is_url(job.path) else None
        try:
            if local is not None:  # decoding opens local files only: fetch the object first
                try:
                    storage.download(job.path, local)
                except (storage.StorageError, OSError) as err:
                    return Failure(path=job.source, reason=f"cannot download it: {err}", key=job.key)
                job = dataclasses.replace(job, path=str(local))
            return self._build(job, part)
        except MediaError as err:
            part.unlink(missing_ok=True)
            return Failure(path=job.source, reason=err.reason, key=job.key)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            if local is not None:
                local.unlink(missing_ok=True)

    def _face_crop(self, path: str) -> tuple[tuple[int, int, int, int] | None, dict]:
        """The face box (x, y, w, h) in displayed pixels, from a first pass over small grey frames, and what the
        json records about it. Without a face: None, and the whole frame is kept."""
        with ClipStream(
            path,
            self.options.fps,
            frame_size=DETECT_SHORT_SIDE,
            shrink_only=True,
            pixel_format="gray",
            with_audio=False,
            threads=self.options.decoder_threads,
        ) as stream:
            if stream.video is None:
                raise MediaError(path, "no video stream (an audio-only file has no frames)")
            count = stream.num_frames
            checked = set(np.linspace(0, count - 1, min(count, DETECT_FRAMES)).round().astype(int).tolist())
            faces = [
                largest_face(as_array(frame), self.face_detector)
                for index, (kind, frame) in enumerate(item for item in stream if item[0] == "frame")
                if index in checked
            ]
            source_size, detect_size = stream.source_size, stream.size
        found = [face for face in faces if face is not None]
        if not found:
            return None, {"method": "opencv", "found": False, "frames_checked": len(checked)}
        scale = (source_size[0] / detect_size[0], source_size[1] / detect_size[1])
        box = face_box(found, scale, *source_size)
        return tuple(box), {
            "method": "opencv",
            "found": True,
            "box": box,
            "frames_with_face": len(found),
            "frames_checked": len(checked),
        }

    def _build(self, job: ClipJob, part: Path) -> Sample | Failure:
        options, key = self.options, job.key
        crop, face_crop = self._face_crop(job.path) if self.face_detector is not None else (None, {"method": "none"})
        with ClipStream(
            job.path, options.fps, options.sample_rate, options.frame_size, crop=crop, threads=options.decoder_threads
        ) as stream:
            if stream.video is None:
                return Failure(path=job.source, reason="no video stream (an audio-only file has no frames)", key=key)
            with open(part, "wb") as out, tempfile.TemporaryFile(dir=self.parts) as pcm:
                count, last_frame, last_jpeg = 0, None, b""
                for kind, data in stream:
                    if kind == "audio":
                        pcm.write(data)
                        continue
                    if data is not last_frame:  # a repeated last frame is the same object: the same JPEG
                        last_frame, last_jpeg = data, _jpeg(data)
                    out.write(tar_member(f"{key}.{count:04d}.jpg", last_jpeg))
                    count += 1
                transcript = self._transcript(job, stream, pcm)
                pcm.seek(0)
                wav_size = 44 + 2 * stream.num_samples
                out.write(tar_header(f"{key}.wav", wav_size) + wav_header(stream.num_samples, options.sample_rate))
                while block := pcm.read(AUDIO_BLOCK):
                    out.write(block)
                out.write(tar_padding(wav_size))
                meta = {
                    "key": key,
                    "source": job.source,
                    "split": options.split,
                    "fps": options.fps,
                    "num_frames": count,
                    "duration_s": stream.duration_s,
                    "sample_rate": options.sample_rate,
                    "has_audio": stream.has_audio,
                    "labels": job.labels,
                    "transcript": transcript,
                    "face_crop": face_crop,
                }
                if job.filename_note:
                    meta["filename_note"] = job.filename_note
                out.write(tar_member(f"{key}.txt", transcript.encode()))
                out.write(tar_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()))
        return Sample(key=key, part=part, num_frames=count, duration_s=stream.duration_s)

    def _transcript(self, job: ClipJob, stream: ClipStream, pcm) -> str:
        if job.transcript is not None:
            return job.transcript
        if self.transcriber is None or not stream.has_audio:
            return ""
        pcm.seek(0)  # Whisper takes the whole waveform: with --asr the clip's audio is in memory once
        audio = np.frombuffer(pcm.read(), "<i2").astype(np.float32) / 32768.0
        return self.transcriber(audio, self.options.sample_rate)
