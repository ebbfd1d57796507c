"""Reading planned samples out of tar shards as raw bytes.

A sample is a run of tar members sharing a key (the WebDataset rule: the key is the member name up to the
first dot of its base name, the rest is the extension, so `00001.0003.jpg` is entry `0003.jpg` of sample
`00001`). Only entries a mode asks for are read; every other member (a `.pyd` or `.pickle` too) is passed
over without reading its bytes, and nothing is ever unpickled: decoding happens later, on the bytes.

Local paths and `pipe:` commands open with webdataset's gopen; `scheme://` URLs (s3://, gs://, any fsspec file
system) stream through emi.storage, which retries transient errors and resumes at the byte it had reached, so a
shard read across an object store's restart yields each of its samples once.

Of the entries a mode asks for, `select` may keep fewer once it has seen the sample's whole list (frame mode
decodes one frame of a clip's dozens). A local shard is read with seeks: the headers of a sample first, then only
the selected entries' bytes. A stream (`pipe:`, a FIFO) cannot go back, so there every wanted entry is read and the
selection applied afterwards: the same samples, more bytes read.
"""

from __future__ import annotations

import logging
import math
import re
import tarfile
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from webdataset.gopen import gopen, set_options
from webdataset.tariterators import base_plus_ext

from emi.data.plan import Segment
from emi.storage import is_url, open_stream

log = logging.getLogger(__name__)

# What a damaged shard or a failing `pipe:` command raises while it is read.
READ_ERRORS = (tarfile.TarError, OSError, EOFError)
# (sample key, the extensions of its wanted entries) -> the extensions to read
Select = Callable[[str, list[str]], Collection[str]]


@dataclass
class RawSample:
    key: str
    url: str
    entries: dict[str, bytes] = field(default_factory=dict)
    shard: int = -1  # its shard's index in the list read_segments read (-1: read otherwise)


def open_shard(url: str) -> IO[bytes]:
    """A byte stream of a shard: a local path, a `pipe:` command or an fsspec URL."""
    return open_stream(url) if is_url(url) else gopen(url)


def close_quietly(stream: IO[bytes]) -> None:
    """Close a shard stream. A `pipe:` command stopped early exits on SIGPIPE, which is expected here;
    a command that failed on its own has already raised while it was read."""
    set_options(stream, ignore_errors=True)
    try:
        stream.close()
    except READ_ERRORS:
        pass


def iter_members(
    stream: IO[bytes], seekable: bool = False
) -> Iterator[tuple[str, str, tarfile.TarFile, tarfile.TarInfo]]:
    """(key, extension, tar, member) for each regular file of a tar stream that has a key. A seekable stream is
    opened for random access: a member's bytes are then read only when asked for, and skipped with a seek."""
    tar = tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")  # noqa: SIM115 (the caller closes the stream)
    for member in tar:
        key, extension = base_plus_ext(member.name)
        if member.isreg() and key is not None and not key.startswith("__"):
            yield key, extension, tar, member


def count_samples(url: str) -> int:
    """Samples in a tar, counted by streaming it once; a damaged tar is counted up to the damage."""
    count, previous = 0, None
    stream = open_shard(url)
    try:
        for key, _, _, _ in iter_members(stream):
            if key != previous:
                count, previous = count + 1, key
    except READ_ERRORS as err:
        log.warning("shard %s: unreadable after %d samples (%s); counting only those", url, count, err)
    finally:
        close_quietly(stream)
    return count


def read_segments(
    urls: Sequence[str],
    segments: Iterable[Segment],
    skip: Container[int],
    wanted: re.Pattern[str],
    select: Select | None = None,
    repeats_from: float = math.inf,
    subsets: Sequence[Container[str] | None] = (),
) -> Iterator[tuple[int, RawSample | None]]:
    """(position, sample) for every planned position not in `skip`, in plan order; each sample holds the entries
    whose extension `wanted` matches, of those only the ones `select` keeps (all without `select`).

    Positions number the samples of `segments` consecutively from 0. `subsets[shard]`, where given and not None,
    holds the keys of the samples the shard contributes (a fold): the others are passed over unread and uncounted,
    so a segment's indices count those samples only. A position whose sample cannot be read (a truncated tar, a
    failing pipe, a shard shorter than its manifest says) comes as None, after a warning naming the shard;
    positions from `repeats_from` on read samples again that were reported where they came first, so for them the
    message is a debug one. Shards whose planned samples are all skipped are not opened.
    """
    position = 0
    for segment in segments:
        length = segment.stop - segment.start
        if any(p not in skip for p in range(position, position + length)):
            subset = subsets[segment.shard] if subsets else None
            yield from _read_segment(urls[segment.shard], segment, position, skip, wanted, select, repeats_from, subset)
        position += length


def _read_segment(
    url: str,
    segment: Segment,
    first: int,
    skip: Container[int],
    wanted: re.Pattern[str],
    select: Select | None,
    repeats_from: float,
    subset: Container[str] | None,
) -> Iterator[tuple[int, RawSample | None]]:
    index, previous = -1, None  # index: of the current sample within the shard
    pending: dict[str, bytes | tarfile.TarInfo] | None = None  # the current sample's wanted entries, if planned
    problem = None
    try:
        stream = open_shard(url)
    except READ_ERRORS as err:
        stream, problem = None, f"cannot open ({err})"
    if stream is not None:
        seekable = _seekable(stream)
        try:
            for key, extension, tar, member in iter_members(stream, seekable):
                if subset is not None and key not in subset:
                    continue
                if key != previous:
                    if pending is not None:
                        yield (
                            first + index - segment.start,
                            _raw_sample(previous, url, segment.shard, pending, tar, select),
                        )
                        pending = None
                    index, previous = index + 1, key
                    if index >= segment.stop:
                        break
                    if index >= segment.start and first + index - segment.start not in skip:
                        pending = {}
                if pending is not None and wanted.fullmatch(extension):
                    # seekable: read once the sample's entries are all known, and only those selected
                    pending[extension] = member if seekable else tar.extractfile(member).read()
            else:
                if pending is not None:
                    yield first + index - segment.start, _raw_sample(previous, url, segment.shard, pending, tar, select)
                index += 1
                if index < segment.stop:
                    problem = f"the shard ends after {index} samples, the plan expects {segment.stop}"
        except READ_ERRORS as err:
            problem = f"unreadable in sample {previous!r} (index {index}): {err}"
        finally:
            close_quietly(stream)
    if problem is not None:
        yield from _unread(
            url, segment, first, skip, range(max(index, segment.start), segment.stop), problem, repeats_from
        )


def _unread(
    url: str, segment: Segment, first: int, skip: Container[int], missing: range, problem: str, repeats_from: float
) -> Iterator[tuple[int, None]]:
    """(position, None) for the planned samples of a segment that could not be read, after one message naming the
    shard and why (a debug one where they are repeats, reported where they came first)."""
    repeat = first + missing.start - segment.start >= repeats_from
    (log.debug if repeat else log.warning)(
        "shard %s: %s; skipping its samples %d..%d", url, problem, missing.start, missing.stop - 1
    )
    for shard_index in missing:
        if first + shard_index - segment.start not in skip:
            yield first + shard_index - segment.start, None


def _seekable(stream: IO[bytes]) -> bool:
    seekable = getattr(stream, "seekable", None)  # a webdataset Pipe has no such method
    return bool(seekable and seekable())


def _raw_sample(
    key: str,
    url: str,
    shard: int,
    pending: dict[str, bytes | tarfile.TarInfo],
    tar: tarfile.TarFile,
    select: Select | None,
) -> RawSample:
    chosen = pending.keys() if select is None else select(key, list(pending))
    entries = {
        extension: tar.extractfile(data).read() if isinstance(data, tarfile.TarInfo) else data
        for extension, data in pending.items()
        if extension in chosen
    }
    return RawSample(key, url, entries, shard)
