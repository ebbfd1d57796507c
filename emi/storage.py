"""Where shards, manifests and reports live: a local path, or a URL of any fsspec file system (`s3://bucket/prefix`,
`gs://...`, ...). `pipe:` commands are the reader's business (emi.data.reader), not this module's.

Credentials and endpoints come from where the file system's own library looks (for S3: the AWS_* environment
variables, ~/.aws/config and ~/.aws/credentials, AWS_ENDPOINT_URL for S3-compatible stores); nothing here takes a
secret, and `shown` strips any user:password from a URL before it goes into a message, log or manifest.

Transient errors (a connection reset or refused, a 5xx, a read that ends before the object does) are retried with
backoff for up to RETRY_DEADLINE_S; `ResumableReader` reopens the object at the byte it had reached, so a stream
resumes exactly where it broke. Permanent errors (no such bucket or key, access denied, no credentials) raise
StorageError at once, naming the URL. Objects are written whole (a put of a complete local file or of bytes): a
killed writer leaves no partial object, since an S3 object (multipart uploads included) appears only when complete.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from emi.errors import UsageError
from emi.io import sha256_file, temporary_path, write_atomic

log = logging.getLogger(__name__)

RETRY_DEADLINE_S = 180.0  # long enough for an object store to restart
BACKOFF_S = (0.5, 10.0)  # first wait, longest wait; doubled after each failure
READ_BLOCK = 8 << 20  # bytes fetched per ranged read of a remote object
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "InvalidConfigError"}
T = TypeVar("T")


class StorageError(UsageError):
    """A remote location that cannot be used however often one tries (no such bucket, access denied, ...)."""


def is_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` locations (fsspec URLs); False for local paths and `pipe:` commands."""
    return isinstance(location, str) and bool(_URL.match(location))


def shown(location: str | os.PathLike) -> str:
    """The location as it may appear in messages, logs and manifests: without user:password."""
    return _USERINFO.sub(r"\1", str(location))


def join(location: str | os.PathLike, name: str) -> str | Path:
    """`name` inside a folder or URL prefix."""
    if is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return Path(location) / name


def basename(location: str | os.PathLike) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{shown(url)}: no file system for this URL ({err})") from None


def _is_permanent(err: BaseException) -> bool:
    return (isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                             ValueError, TypeError, UsageError))
            or type(err).__name__ in _PERMANENT_NAMES)


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return f"no such bucket or object ({err})"
    if isinstance(err, PermissionError):
        return f"access denied: check the credentials ({err})"
    return f"{type(err).__name__}: {err}"


def retrying(url: str, what: str, action: Callable[[], T]) -> T:
    """`action()`, retried with backoff on transient errors for up to RETRY_DEADLINE_S. A permanent error raises
    StorageError naming the URL; a transient one that outlasts the deadline raises OSError naming it (which the
    reader treats as a damaged shard, and the builder as a failed write)."""
    deadline = time.monotonic() + RETRY_DEADLINE_S
    wait = BACKOFF_S[0]
    while True:
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - sorted into permanent and transient right here
            if _is_permanent(err):
                if isinstance(err, StorageError):
                    raise
                raise StorageError(f"{shown(url)}: cannot {what}: {_reason(err)}") from None
            if time.monotonic() + wait > deadline:
                raise OSError(f"{shown(url)}: cannot {what}, still failing after retrying "
                              f"{RETRY_DEADLINE_S:.0f} s: {_reason(err)}") from None
            log.warning("%s: cannot %s (%s); retrying in %.2f s", shown(url), what, _reason(err), wait)
            time.sleep(wait)
            wait = min(2 * wait, BACKOFF_S[1])


class ResumableReader(io.RawIOBase):
    """A remote object read front to back in READ_BLOCK ranges; a transient error, or an end before the object's
    size, reopens it at the byte reached (after a backoff), so the stream goes on with nothing lost or repeated."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.fs, self.path = _filesystem(url)
        self.size = retrying(url, "open it", lambda: self.fs.size(self.path))
        self.offset = 0
        self._file = None

    def readable(self) -> bool:
        return True

    def _read(self, size: int) -> bytes:
        if self._file is None:
            self._file = self.fs.open(self.path, "rb", block_size=READ_BLOCK, cache_type="readahead")
            self._file.seek(self.offset)
        return self._file.read(size)

    def _reset(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.size - self.offset)
        if want <= 0:
            return 0

        def attempt() -> bytes:
            try:
                data = self._read(want)
                if not data:  # a response cut short: the connection closed before the object's end
                    raise EOFError(f"the object ended at byte {self.offset} of {self.size}")
                return data
            except Exception:
                self._reset()
                raise

        data = retrying(self.url, f"read it at byte {self.offset}", attempt)
        buffer[:len(data)] = data
        self.offset += len(data)
        return len(data)

    def close(self) -> None:
        self._reset()
        super().close()


def open_stream(location: str | os.PathLike) -> IO[bytes]:
    """A buffered binary stream of a local file or a remote object (resumed across transient errors)."""
    if is_url(location):
        return io.BufferedReader(ResumableReader(str(location)), buffer_size=1 << 20)
    return open(location, "rb")


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError when there is none."""
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _filesystem(str(location))

    def get() -> bytes:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    data = retrying(str(location), "read it", get)
    if data is None:
        raise FileNotFoundError(f"{shown(location)}: no such object")
    return data


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: atomically renamed into place locally, one put remotely."""
    if not is_url(location):
        write_atomic(Path(location), data)
        return
    fs, path = _filesystem(str(location))
    retrying(str(location), "write it", lambda: fs.pipe_file(path, data))


def upload(local: Path, location: str | os.PathLike) -> None:
    """Put a complete local file at `location` (a URL), or rename it there (a local path)."""
    if not is_url(location):
        os.replace(local, location)
        return
    fs, path = _filesystem(str(location))
    retrying(str(location), "upload it", lambda: fs.put_file(str(local), path))


def upload_folder(folder: Path, location: str | os.PathLike, last: str | None = None) -> None:
    """Copy a local folder's files (recursively) to `location`, a URL prefix or a folder, each file whole; `last`,
    a file whose presence says the copy is complete, goes after all the others."""
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    files.sort(key=lambda path: path.relative_to(folder).as_posix() == last)
    for path in files:
        target = join(location, path.relative_to(folder).as_posix())
        if is_url(location):
            upload(path, target)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, temporary_path(Path(target)))
            os.replace(temporary_path(Path(target)), target)


def exists(location: str | os.PathLike) -> bool:
    if not is_url(location):
        return os.path.exists(location)
    fs, path = _filesystem(str(location))
    return retrying(str(location), "look it up", lambda: fs.isfile(path))


def size(location: str | os.PathLike) -> int | None:
    """Bytes in the file, None when there is none."""
    if not is_url(location):
        try:
            return os.stat(location).st_size
        except FileNotFoundError:
            return None
    fs, path = _filesystem(str(location))

    def get() -> int | None:
        try:
            return fs.size(path)
        except FileNotFoundError:
            return None

    return retrying(str(location), "look it up", get)


def list_names(folder: str | os.PathLike) -> list[str]:
    """Names of the files directly in a folder or URL prefix ([] when there is none)."""
    if not is_url(folder):
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_file()) if os.path.isdir(folder) else []
    fs, path = _filesystem(str(folder))

    def get() -> list[str]:
        try:
            entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(basename(entry["name"]) for entry in entries if entry.get("type") == "file")

    return retrying(str(folder), "list it", get)


def list_tree(folder: str) -> list[str]:
    """Paths, relative to a URL prefix, of every object under it ([] when there is none)."""
    fs, path = _filesystem(folder)
    root = path.rstrip("/")

    def get() -> list[str]:
        try:
            found = fs.find(root, withdirs=False)
        except FileNotFoundError:
            return []
        return sorted(name[len(root) + 1:] for name in found if name.startswith(root + "/"))

    return retrying(folder, "list it", get)


def download(location: str, local: Path) -> None:
    """Copy a remote object to a local file, retrying transient errors."""
    fs, path = _filesystem(location)
    retrying(location, "download it", lambda: fs.get_file(path, str(local)))


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it is there."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _filesystem(str(location))

    def delete() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retrying(str(location), "delete it", delete)


def sha256(location: str | os.PathLike) -> str:
    if not is_url(location):
        return sha256_file(Path(location))
    digest = hashlib.sha256()
    with open_stream(location) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


