"""Where shards, manifests and reports live: a local path, or a URL of any fsspec file system (`s3://bucket/prefix`,
`gs://...`, ...). `pipe:` commands are the reader's business (emi.data.reader), not this module's.

Credentials and endpoints come from where the file system's own library looks (for S3: the AWS_* environment
variables, ~/.aws/config and ~/.aws/credentials, AWS_ENDPOINT_URL for S3-compatible stores); nothing here takes a
secret, and `shown` strips any user:password from a URL before it goes into a message, log or manifest.

Transient errors (a connection reset or refused, a 5xx, a read that ends before the object does) are retried with
backoff for up to RETRY_DEADLINE_S; `ResumableReader` reads the object in ranges from the byte it has reached, so a
stream resumes exactly where it broke. Every call to the object store is bounded: one that gets no answer within
CALL_TIMEOUT_S (plus the time its bytes take at MIN_BYTES_PER_S) is abandoned and retried like a transient error,
so a stuck store ends in StorageUnavailable, naming the URL, after the retry deadline; it never hangs. Permanent
errors (no such bucket or key, access denied, no credentials) raise StorageError at once, naming the URL. Objects
are written whole (a put of a complete local file or of bytes): a killed writer leaves no partial object, since an
S3 object (multipart uploads included) appears only when complete.

Each process has its own file system objects (`_filesystem`), never fsspec's shared instance cache: a forked
process (a DataLoader worker) inherits its parent's objects and their open connections, and fsspec empties its
cache in the child, whose garbage collector then closed the inherited connections through the parent's event loop
(epoll is shared across a fork): the parent's next request waited for ever. Here the parent's objects stay
referenced in the child, which makes its own.
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
CALL_TIMEOUT_S = 60.0  # the longest one call may go unanswered (botocore's own read timeout is 60 s too)
MIN_BYTES_PER_S = 1 << 20  # a transfer may take CALL_TIMEOUT_S plus its bytes at this rate
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "InvalidConfigError"}
T = TypeVar("T")


class StorageError(UsageError):
    """A remote location that cannot be used however often one tries (no such bucket, access denied, ...)."""


class StorageUnavailable(OSError):
    """A remote location that kept failing (or not answering) until the retry deadline: the work stops there, and a
    re-run continues once the store answers again."""


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


_FILESYSTEMS: dict[tuple[int, str, str], object] = {}  # (pid, protocol, options in the URL) -> file system


def _filesystem(url: str):
    """(file system, path) of a URL: one file system object per process and protocol (see the module docstring)."""
    import fsspec

    try:
        protocol = fsspec.core.split_protocol(url)[0]
        cls = fsspec.get_filesystem_class(protocol)
        options = cls._get_kwargs_from_urls(url)
        key = (os.getpid(), protocol, repr(sorted(options.items())))
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = cls(skip_instance_cache=True, **options)
        return _FILESYSTEMS[key], cls._strip_protocol(url)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{shown(url)}: no file system for this URL ({err})") from None


def forget_filesystems() -> None:
    """Drop this process's file system objects: the next call makes new ones, with the credentials and endpoint the
    environment holds then."""
    for key in [key for key in _FILESYSTEMS if key[0] == os.getpid()]:
        del _FILESYSTEMS[key]


def _bounded(fs, method: str, *args, size: int = 0, **kwargs):
    """fs.method(*args, **kwargs), abandoned with TimeoutError when it goes unanswered for CALL_TIMEOUT_S plus `size`
    bytes at MIN_BYTES_PER_S. fsspec's asynchronous file systems (s3, gcs, http, ...) take the bound themselves;
    a synchronous one returns or fails on its own."""
    import fsspec.asyn

    if isinstance(fs, fsspec.asyn.AsyncFileSystem):
        kwargs["timeout"] = CALL_TIMEOUT_S + size / MIN_BYTES_PER_S
    return getattr(fs, method)(*args, **kwargs)


def _is_permanent(err: BaseException) -> bool:
    return (
        isinstance(
            err,
            (
                FileNotFoundError,
                PermissionError,
                IsADirectoryError,
                NotADirectoryError,
                ValueError,
                TypeError,
                UsageError,
            ),
        )
        or type(err).__name__ in _PERMANENT_NAMES
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError):  # fsspec's FSTimeoutError too
        return f"no answer within the call's time limit ({type(err).__name__})"
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
                raise StorageUnavailable(
                    f"{shown(url)}: cannot {what}, still failing after retrying "
                    f"{RETRY_DEADLINE_S:.0f} s: {_reason(err)}"
                ) from None
            log.warning("%s: cannot %s (%s); retrying in %.2f s", shown(url), what, _reason(err), wait)
            time.sleep(wait)
            wait = min(2 * wait, BACKOFF_S[1])


class ResumableReader(io.RawIOBase):
    """A remote object read front to back in ranged requests of at most READ_BLOCK bytes, each bounded in time; a
    transient error, a request unanswered, or an answer that ends early is retried (after a backoff) from the byte
    reached, so the stream goes on with nothing lost or repeated."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.fs, self.path = _filesystem(url)
        self.size = retrying(url, "open it", lambda: _bounded(self.fs, "size", self.path))
        self.offset = 0

    def readable(self) -> bool:
        return True

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes from `offset`: one ranged request."""
        end = self.offset + min(size, READ_BLOCK)
        return _bounded(self.fs, "cat_file", self.path, start=self.offset, end=end, size=end - self.offset)

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.size - self.offset)
        if want <= 0:
            return 0

        def attempt() -> bytes:
            data = self._read(want)
            if not data:  # a response cut short: the connection closed before the object's end
                raise EOFError(f"the object ended at byte {self.offset} of {self.size}")
            return data[:want]

        data = retrying(self.url, f"read it at byte {self.offset}", attempt)
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)


def open_stream(location: str | os.PathLike) -> IO[bytes]:
    """A buffered binary stream of a local file or a remote object (resumed across transient errors)."""
    if is_url(location):
        # A buffer of READ_BLOCK makes each request READ_BLOCK bytes; a smaller one would cap every request at its
        # size (a 1 MiB buffer cost twice the wall time and 1.8x the CPU of reading a shard in 8 MiB requests).
        return io.BufferedReader(ResumableReader(str(location)), buffer_size=READ_BLOCK)
    return open(location, "rb")


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError when there is none."""
    if not is_url(location):
        return Path(location).read_bytes()
    fs, path = _filesystem(str(location))

    def get() -> bytes:
        try:
            return _bounded(fs, "cat_file", path)
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
    retrying(str(location), "write it", lambda: _bounded(fs, "pipe_file", path, data, size=len(data)))


def upload(local: Path, location: str | os.PathLike) -> None:
    """Put a complete local file at `location` (a URL), or rename it there (a local path)."""
    if not is_url(location):
        os.replace(local, location)
        return
    fs, path = _filesystem(str(location))
    size = os.path.getsize(local)
    retrying(str(location), "upload it", lambda: _bounded(fs, "put_file", str(local), path, size=size))


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
    return retrying(str(location), "look it up", lambda: _bounded(fs, "isfile", path))


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
            return _bounded(fs, "size", path)
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
            entries = _bounded(fs, "ls", path.rstrip("/"), detail=True, refresh=True)
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
            found = _bounded(fs, "find", root, withdirs=False)
        except FileNotFoundError:
            return []
        return sorted(name[len(root) + 1 :] for name in found if name.startswith(root + "/"))

    return retrying(folder, "list it", get)


def download(location: str, local: Path) -> None:
    """Copy a remote object to a local file, retrying transient errors."""
    fs, path = _filesystem(location)
    size = retrying(location, "look it up", lambda: _bounded(fs, "size", path))
    retrying(location, "download it", lambda: _bounded(fs, "get_file", path, str(local), size=size))


def make_bucket(url: str) -> None:
    """Create the bucket (or top folder) of a URL such as s3://name, if it is not there."""
    fs, path = _filesystem(url)

    def create() -> None:
        try:
            _bounded(fs, "mkdir", path, create_parents=True)
        except FileExistsError:
            pass

    retrying(url, "create it", create)


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it is there."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _filesystem(str(location))

    def delete() -> None:
        try:
            _bounded(fs, "rm_file", path)
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
