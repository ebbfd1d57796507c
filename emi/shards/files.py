"""Shard files: deterministic tar writing under a temporary name, failures.jsonl, reading samples' json back.

The manifest that lists the shards is emi.manifest's.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

from emi.io import sha256_file, temporary_path
from emi.manifest import ShardEntry

FAILURES = "failures.jsonl"
MEMBER_MTIME = 0  # fixed, so identical inputs give byte-identical shards


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str) -> re.Pattern:
    return re.compile(re.escape(split) + r"-\d{6}\.tar")


class ShardWriter:
    """Writes one tar under its temporary name; `finish` renames it into place and returns its manifest entry."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = temporary_path(path)
        self.tar = tarfile.open(self.tmp, "w")
        self.keys: list[str] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def finish(self) -> ShardEntry:
        self.tar.close()
        with open(self.tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(self.tmp, self.path)
        return ShardEntry(name=self.path.name, num_samples=len(self.keys), bytes=self.path.stat().st_size,
                          sha256=sha256_file(self.path), keys=list(self.keys))


def read_failures(folder: Path) -> list[dict]:
    """The records of failures.jsonl, [] when there is none; ValueError when a line is not a JSON object."""
    path = folder / FAILURES
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def read_sample_metadata(path: Path) -> list[dict]:
    """The `<key>.json` entries of a shard, in order; ValueError when the shard is damaged."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [json.loads(tar.extractfile(member).read()) for member in tar
                    if member.isfile() and member.name.endswith(".json")]
    except (OSError, tarfile.TarError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable shard ({err})") from None
