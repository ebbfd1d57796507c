"""Shard specs -> the shard URLs with their sample counts, and the manifests that describe them.

A spec is anything WebDataset accepts: a local path, a brace pattern, a `pipe:` command, an fsspec URL
(`s3://bucket/prefix/train-{000000..000009}.tar`), a folder or URL prefix holding a `manifest.json`, a
`::`-separated list of these (as OpenCLIP) or a Python list of them. Counts come from a manifest (emi.formats.manifest),
the explicit one or the one beside the shards (in the same folder or URL prefix); a shard no manifest lists is
counted by streaming it once.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from emi import storage
from emi.data.reader import count_samples
from emi.errors import UsageError
from emi.formats.manifest import FEATURE_SHARDS, MANIFEST_FILE, Manifest, ShardEntry, find_manifest, read_manifest

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"[^/\s:'\"]+\.(?:tar\.gz|tgz|tar)\b")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    num_samples: int
    keys: frozenset[str] | None = None  # read only the samples with these keys (a fold); num_samples counts them


@dataclass(frozen=True)
class ShardSet:
    """What a shard spec names: the shards in order, and the manifests that counted them (each once, in order
    of first use); shards no manifest lists were counted by streaming them."""

    spec: str
    shards: list[ShardInfo]
    manifests: list[Manifest]
    undescribed: list[str]  # URLs of the shards no manifest lists
    entries: list[ShardEntry | None] = field(default_factory=list)  # per shard, its manifest's entry (None: none)

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def manifest(self, needed_by: str) -> Manifest:
        """The one description of every shard: their manifest, or the first of several folders' manifests, which
        must agree on what the samples are. UsageError, saying what `needed_by` needs, when there is none."""
        if self.undescribed:
            raise UsageError(
                f"{needed_by}: no {MANIFEST_FILE} lists shard {self.undescribed[0]}, so how its clips "
                "were prepared (fps, labels, ...) is unknown; put the manifest beside the shards or "
                "pass it explicitly (--manifest / data.manifest)"
            )
        first, *others = self.manifests
        for other in others:
            for name in ("format", "labels", "preprocessing", "dims", "encoders"):
                if getattr(other, name) != getattr(first, name):
                    raise UsageError(
                        f"{needed_by}: {self.spec} mixes shards whose manifests differ in {name} "
                        f"({first.path}: {getattr(first, name)!r}, {other.path}: "
                        f"{getattr(other, name)!r}); use them one folder at a time"
                    )
        return first


def is_remote(url: str) -> bool:
    """True for `pipe:` commands and `scheme://` URLs (emi.data.reader.open_shard opens both)."""
    return url.startswith("pipe:") or "://" in url


def shard_name(url: str) -> str:
    """The shard file name a URL refers to, the key to look it up in a manifest.

    `pipe:curl -s http://host/train-000001.tar` -> `train-000001.tar`.
    """
    names = _SHARD_NAME.findall(url)
    return names[-1] if names else os.path.basename(url)


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Every shard URL a spec names, in order; a folder expands to the shards its manifest lists."""
    if not isinstance(spec, str):
        return [url for part in spec for url in expand_urls(part)]
    urls = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if _is_folder(part):
            urls += [str(storage.join(part, entry.name)) for entry in read_manifest(part).shards]
            continue
        for url in braceexpand.braceexpand(part):
            if not is_remote(url) and not os.path.isfile(url):
                raise UsageError(f"shard {url}: no such file or folder")
            urls.append(url)
    return urls


def _is_folder(part: str) -> bool:
    """A local folder, or a URL prefix (no shard name, no braces) with a manifest.json in it."""
    if storage.is_url(part):
        return not _SHARD_NAME.search(part) and "{" not in part and storage.exists(storage.join(part, MANIFEST_FILE))
    return not is_remote(part) and os.path.isdir(part)


def _folder(url: str) -> str | None:
    """The folder or URL prefix a shard lies in, where a manifest beside it would be; None for `pipe:`."""
    if storage.is_url(url):
        return url.rsplit("/", 1)[0]
    return None if is_remote(url) else os.path.dirname(os.path.abspath(url))


def resolve_shards(spec: str | Sequence[str] | ShardSet, manifest: str | Path | None = None) -> ShardSet:
    """The shards a spec names with their sample counts, and the manifests those came from.

    A count comes from, in order: the explicit `manifest` (needed for `pipe:` commands), the `manifest.json` in
    the shard's own folder or URL prefix, or else from streaming the shard once (with a warning).
    An already resolved ShardSet is returned as it is.
    """
    if isinstance(spec, ShardSet):
        return spec
    urls = expand_urls(spec)
    if not urls:
        raise UsageError(f"shard spec {spec!r} names no shards")
    explicit = read_manifest(manifest) if manifest is not None else None
    folder_manifests: dict[str, Manifest | None] = {}
    used: dict[int, Manifest] = {}  # by id: in order of first use
    shards, undescribed, entries = [], [], []
    for url in urls:
        name = shard_name(url)
        source = explicit if explicit is not None and name in explicit.counts else None
        folder = _folder(url)
        if source is None and folder is not None:
            if folder not in folder_manifests:
                folder_manifests[folder] = find_manifest(folder)
            candidate = folder_manifests[folder]
            source = candidate if candidate is not None and name in candidate.counts else None
        if source is None:
            log.warning(
                "shard %s: no manifest lists it, counting its samples by reading it once "
                "(write a %s beside the shards or pass manifest= to skip this)",
                url,
                MANIFEST_FILE,
            )
            count = count_samples(url)
            undescribed.append(url)
            entries.append(None)
        else:
            count = source.counts[name]
            used.setdefault(id(source), source)
            entries.append(source.entry(name))
        shards.append(ShardInfo(url, count))
    named = spec if isinstance(spec, str) else "::".join(spec)
    resolved = ShardSet(named, shards, list(used.values()), undescribed, entries)
    if resolved.num_samples == 0:
        raise UsageError(f"shard spec {spec!r}: its {len(shards)} shards hold no samples")
    return resolved


def feature_shards(shards: str, manifest: str | None, needed_by: str) -> tuple[ShardSet, Manifest]:
    """Feature shards (written by `emi features extract`) and their manifest."""
    shard_set = resolve_shards(shards, manifest)
    described = shard_set.manifest(needed_by)
    if not described.is_features:
        raise UsageError(
            f"{needed_by}: {shards} are {described.format} shards ({described.path}); Stage II reads "
            f"{FEATURE_SHARDS} shards: run `emi features extract` first"
        )
    return shard_set, described
