"""Shard specs -> a list of shard URLs with their sample counts.

A spec is anything WebDataset accepts: a local path, a brace pattern, a `pipe:` command, a folder holding
a `manifest.json`, a `::`-separated list of these (as OpenCLIP) or a Python list of them. Counts come from
a manifest; a shard no manifest lists is counted by streaming it once.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from emi.data.reader import count_samples
from emi.errors import UsageError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMATS = ("emi-shards/1", "emi-features/1")  # clip shards, feature shards
_SHARD_NAME = re.compile(r"[^/\s:'\"]+\.(?:tar\.gz|tgz|tar)\b")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int


def is_remote(url: str) -> bool:
    """True for `pipe:` commands and `scheme://` URLs, which are opened with webdataset.gopen as they are."""
    return url.startswith("pipe:") or "://" in url


def shard_name(url: str) -> str:
    """The shard file name a URL refers to, the key to look it up in a manifest.

    `pipe:curl -s http://host/train-000001.tar` -> `train-000001.tar`.
    """
    names = _SHARD_NAME.findall(url)
    return names[-1] if names else os.path.basename(url)


def read_manifest(path: str | Path) -> dict[str, int]:
    """Shard name -> sample count from an `emi-shards/1` or `emi-features/1` manifest."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"manifest {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"manifest {path}: not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in MANIFEST_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UsageError(f"manifest {path}: format is {found!r}, expected one of {MANIFEST_FORMATS}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise UsageError(f"manifest {path}: 'shards' must be a list")
    counts = {}
    for entry in shards:
        name = entry.get("name") if isinstance(entry, dict) else None
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UsageError(f"manifest {path}: bad shard entry {entry!r} (needs a name and num_samples >= 0)")
        counts[name] = count
    return counts


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Every shard URL a spec names, in order; a folder expands to the shards its manifest lists."""
    if not isinstance(spec, str):
        return [url for part in spec for url in expand_urls(part)]
    urls = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if not is_remote(part) and os.path.isdir(part):
            urls += [os.path.join(part, name) for name in read_manifest(os.path.join(part, MANIFEST_NAME))]
            continue
        for url in braceexpand.braceexpand(part):
            if not is_remote(url) and not os.path.isfile(url):
                raise UsageError(f"shard {url}: no such file or folder")
            urls.append(url)
    return urls


def resolve_shards(spec: str | Sequence[str], manifest: str | Path | None = None) -> list[ShardInfo]:
    """Shard URLs with sample counts.

    A count comes from, in order: the explicit `manifest` (needed for `pipe:` and remote URLs), the
    `manifest.json` in the shard's own folder, or else from streaming the shard once (with a warning).
    """
    urls = expand_urls(spec)
    if not urls:
        raise UsageError(f"shard spec {spec!r} names no shards")
    explicit = read_manifest(manifest) if manifest is not None else {}
    folder_manifests: dict[str, dict[str, int]] = {}
    shards = []
    for url in urls:
        name = shard_name(url)
        count = explicit.get(name)
        if count is None and not is_remote(url):
            folder = os.path.dirname(os.path.abspath(url))
            if folder not in folder_manifests:
                path = os.path.join(folder, MANIFEST_NAME)
                folder_manifests[folder] = read_manifest(path) if os.path.isfile(path) else {}
            count = folder_manifests[folder].get(name)
        if count is None:
            log.warning("shard %s: no manifest lists it, counting its samples by reading it once "
                        "(write a %s beside the shards or pass manifest= to skip this)", url, MANIFEST_NAME)
            count = count_samples(url)
        shards.append(ShardInfo(url, count))
    if sum(shard.num_samples for shard in shards) == 0:
        raise UsageError(f"shard spec {spec!r}: its {len(shards)} shards hold no samples")
    return shards
