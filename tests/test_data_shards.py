"""Shards in the builder's format for the emi.data tests (`write_shards`), and tests of the tar reader."""

from __future__ import annotations

import json
import pickle
import re
import tarfile
from pathlib import Path

import pytest

from emi.data.plan import Segment
from emi.data.reader import count_samples, read_segments

from helpers import PickleBomb, write_shards

ALL_ENTRIES = re.compile(r".*")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    out = tmp_path_factory.mktemp("reader")
    marker = out / "unpickled"
    keys = write_shards(
        out,
        [4, 3],
        edits={"s0-001": {"pyd": pickle.dumps(PickleBomb(marker)), "pickle": pickle.dumps(PickleBomb(marker))}},
    )
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
    cut.write_bytes(source.read_bytes()[: third.offset_data + third.size // 2])
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
    monkeypatch.setattr(
        tarfile.TarFile,
        "extractfile",
        lambda tar, member: extracted.append(member.name) or real_extractfile(tar, member),
    )
    local = list(read_segments([url], [Segment(0, 0, 4)], set(), ALL_ENTRIES, middle_frame))
    assert [key for key, _ in asked] == keys[0] and all("wav" in extensions for _, extensions in asked)
    assert sorted(extracted) == sorted(f"{raw.key}.{ext}" for _, raw in local for ext in raw.entries)
    for (_, raw), (_, extensions) in zip(local, asked):
        frames = sorted(ext for ext in extensions if ext.endswith(".jpg"))
        assert set(raw.entries) == {"json", frames[len(frames) // 2]}
    piped = list(read_segments([f"pipe:cat {url}"], [Segment(0, 0, 4)], set(), ALL_ENTRIES, middle_frame))
    assert [(p, raw.key, raw.entries) for p, raw in piped] == [(p, raw.key, raw.entries) for p, raw in local]
