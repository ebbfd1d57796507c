"""`emi shards stats DIR|URL`: what a shard folder holds, from its manifest and every sample's json entry."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

from emi import storage
from emi.errors import UsageError
from emi.formats.manifest import CLIP_SHARDS, MANIFEST_FILE, find_manifest
from emi.shards.files import read_failures, scan_shard


def shard_stats(folder: str | Path) -> dict:
    folder = str(folder) if storage.is_url(str(folder)) else Path(folder)
    manifest = find_manifest(folder) if storage.is_url(folder) or folder.is_dir() else None
    if manifest is None:
        raise UsageError(f"{storage.shown(folder)}: no {MANIFEST_FILE} (not a shard folder)")
    if manifest.format != CLIP_SHARDS:
        raise UsageError(f"{manifest.path}: {manifest.format} shards; stats reads clip shards ({CLIP_SHARDS})")
    samples = []
    for entry in manifest.shards:
        path = storage.join(folder, entry.name)
        if storage.size(path) is None:
            raise UsageError(f"{storage.shown(path)}: listed in {MANIFEST_FILE} but missing")
        try:
            metadata = scan_shard(path).metadata
        except ValueError as err:
            raise UsageError(str(err)) from None
        if len(metadata) != entry.num_samples:
            raise UsageError(
                f"{storage.shown(path)}: holds {len(metadata)} samples, {MANIFEST_FILE} says {entry.num_samples}"
            )
        samples += metadata
    try:
        num_failures = len(read_failures(folder))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return {
        "split": manifest.split,
        "shards": len(manifest.shards),
        "samples": len(samples),
        "hours": round(sum(sample["duration_s"] for sample in samples) / 3600, 6),
        "frames": sum(sample["num_frames"] for sample in samples),
        "failures": num_failures,
        "label_means": {
            name: fmean(sample["labels"][name] for sample in samples) if samples else None
            for name in manifest.float_labels
        },
        "has_audio": sum(sample["has_audio"] for sample in samples),
        "transcripts": sum(bool(sample["transcript"].strip()) for sample in samples),
    }
