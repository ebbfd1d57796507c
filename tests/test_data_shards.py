"""Shards in the builder's format for the emi.data tests (`write_shards`), and tests of the tar reader."""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import tarfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from emi import EMI_EMOTIONS
from emi.data.plan import Segment
from emi.data.reader import count_samples, read_segments

FPS = 5
ALL_ENTRIES = re.compile(r".*")


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes((np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def grey_level(frame: int) -> int:
    """The grey level of frame `frame` in pattern="grey" shards: frames are told apart by it."""
    return 20 + 10 * frame


def make_sample(key: str, index: int, num_frames: int, *, size: tuple[int, int], sample_rate: int,
                pattern: str, rng: np.random.Generator) -> dict[str, bytes]:
    width, height = size
    sample = {}
    for frame in range(num_frames):
        if pattern == "grey":
            pixels = np.full((height, width, 3), grey_level(frame), dtype=np.uint8)
        else:
            y, x = np.mgrid[0:height, 0:width]
            base = (x * 3 + y * 2 + 29 * index + 11 * frame) % 256
            pixels = np.stack([base, (base + 80) % 256, (255 - base)], axis=-1).astype(np.uint8)
        sample[f"{frame:04d}.jpg"] = jpeg_bytes(pixels)
    length = num_frames * sample_rate // FPS
    t = np.arange(length) / sample_rate
    waveform = 0.3 * np.sin(2 * math.pi * (200 + 10 * index) * t) + 0.01 * rng.standard_normal(length)
    sample["wav"] = wav_bytes(waveform, sample_rate)
    labels = {name: round(float(rng.uniform()), 3) for name in EMI_EMOTIONS}
    transcript = f"clip {key} speaks"
    sample["txt"] = transcript.encode()
    sample["json"] = json.dumps({
        "key": key, "source": f"{key}.mp4", "split": "train", "fps": FPS, "num_frames": num_frames,
        "duration_s": num_frames / FPS, "sample_rate": sample_rate, "has_audio": True, "labels": labels,
        "transcript": transcript, "face_crop": False}).encode()
    return sample


def write_shards(out: Path, sizes: Sequence[int], *, split: str = "train", frames: tuple[int, int] = (3, 7),
                 size: tuple[int, int] = (64, 48), sample_rate: int = 16000, pattern: str = "gradient",
                 manifest: bool = True, edits: dict[str, dict[str, bytes | None]] | None = None,
                 seed: int = 0, key_prefix: str = "") -> list[list[str]]:
    """Write `<split>-NNNNNN.tar` shards of sizes[i] samples (keys `<key_prefix>s<shard>-<index>`) and a manifest.

    Each sample has 3..7 frames (size = width, height) at 5 fps, a 16-bit PCM wav as long as the frames
    span, a transcript and labels for the six emotions. `edits[key][ext]` replaces an entry, None drops
    it. Returns the keys, per shard, in tar order.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    edits = edits or {}
    keys, entries, index = [], [], 0
    for shard, count in enumerate(sizes):
        name = f"{split}-{shard:06d}.tar"
        shard_keys = [f"{key_prefix}s{shard}-{i:03d}" for i in range(count)]
        with webdataset.TarWriter(str(out / name), encoder=False) as writer:
            for key in shard_keys:
                num_frames = int(rng.integers(frames[0], frames[1] + 1))
                sample = make_sample(key, index, num_frames, size=size, sample_rate=sample_rate,
                                     pattern=pattern, rng=rng)
                for ext, data in edits.get(key, {}).items():
                    if data is None:
                        sample.pop(ext, None)
                    else:
                        sample[ext] = data
                writer.write({"__key__": key, **sample})
                index += 1
        data = (out / name).read_bytes()
        keys.append(shard_keys)
        entries.append({"name": name, "num_samples": count, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "keys": shard_keys})
    if manifest:
        (out / "manifest.json").write_text(json.dumps({
            "format": "emi-shards/1", "split": split, "shards": entries, "num_samples": sum(sizes)}))
    return keys


class PickleBomb:
    """Unpickling this creates a file: proof that a loader unpickled a member."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    out = tmp_path_factory.mktemp("reader")
    marker = out / "unpickled"
    keys = write_shards(out, [4, 3], edits={"s0-001": {"pyd": pickle.dumps(PickleBomb(marker)),
                                                       "pickle": pickle.dumps(PickleBomb(marker))}})
    return out, keys


def read_all(urls: list[str], segments: list[Segment], skip=()) -> list[tuple[int, object]]:
    return list(read_segments(urls, segments, set(skip), ALL_ENTRIES))


def test_reader_groups_members_by_key_and_never_unpickles(shard_dir):
    out, keys = shard_dir
    url = str(out / "train-000000.tar")
    got = read_all([url], [Segment(0, 0, 4)])
    assert [p for p, _ in got] == [0, 1, 2, 3]
    assert [raw.key for _, raw in got] == keys[0]
    first = got[0][1]
    frames = sorted(ext for ext in first.entries if ext.endswith(".jpg"))
    assert frames == [f"{i:04d}.jpg" for i in range(len(frames))] and len(frames) >= 3
    assert {"json", "txt", "wav"} <= set(first.entries)
    assert json.loads(first.entries["json"])["key"] == keys[0][0]
    # The pickle members are plain bytes to the reader; nothing ran them.
    assert got[1][1].entries["pyd"][:1] == b"\x80"
    assert not (out / "unpickled").exists()


def test_reader_reads_a_segment_and_skips_positions_without_reading_them(shard_dir):
    out, keys = shard_dir
    urls = [str(out / "train-000000.tar"), str(out / "train-000001.tar")]
    got = read_all(urls, [Segment(0, 2, 4), Segment(1, 0, 2)], skip={1, 2})
    assert [(p, raw.key) for p, raw in got] == [(0, keys[0][2]), (3, keys[1][1])]


def test_reader_reports_missing_samples_of_a_truncated_shard(shard_dir, tmp_path, caplog):
    out, keys = shard_dir
    source = out / "train-000000.tar"
    with tarfile.open(source) as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith(keys[0][2]))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[:third.offset_data + third.size // 2])
    got = read_all([str(cut)], [Segment(0, 1, 4)])
    assert [(p, raw.key if raw else None) for p, raw in got] == [(0, keys[0][1]), (1, None), (2, None)]
    assert str(cut) in caplog.text and keys[0][2] in caplog.text
    assert count_samples(str(cut)) == 3  # the partly written third sample counts


def test_count_samples_streams_a_tar_and_a_pipe(shard_dir):
    out, _ = shard_dir
    assert count_samples(str(out / "train-000000.tar")) == 4
    assert count_samples(f"pipe:cat {out / 'train-000001.tar'}") == 3


def test_a_local_shard_reads_only_the_selected_entries_and_a_pipe_yields_the_same(shard_dir, monkeypatch):
    """Frame mode decodes one frame of a clip: from a seekable file the other frames' bytes are never read."""
    out, keys = shard_dir
    url = str(out / "train-000000.tar")
    asked = []

    def middle_frame(key: str, extensions: list[str]) -> set[str]:
        asked.append((key, extensions))
        frames = sorted(ext for ext in extensions if ext.endswith(".jpg"))
        return {"json", frames[len(frames) // 2]}

    extracted = []
    real_extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda tar, member: extracted.append(member.name) or real_extractfile(tar, member))
    local = list(read_segments([url], [Segment(0, 0, 4)], set(), ALL_ENTRIES, middle_frame))
    assert [key for key, _ in asked] == keys[0] and all("wav" in extensions for _, extensions in asked)
    assert sorted(extracted) == sorted(f"{raw.key}.{ext}" for _, raw in local for ext in raw.entries)
    for (_, raw), (_, extensions) in zip(local, asked):
        frames = sorted(ext for ext in extensions if ext.endswith(".jpg"))
        assert set(raw.entries) == {"json", frames[len(frames) // 2]}
    piped = list(read_segments([f"pipe:cat {url}"], [Segment(0, 0, 4)], set(), ALL_ENTRIES, middle_frame))
    assert [(p, raw.key, raw.entries) for p, raw in piped] == [(p, raw.key, raw.entries) for p, raw in local]
