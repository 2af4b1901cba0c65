"""Where a shard directory lives: a local directory or a URL (``s3://``, ``gs://``, ``http(s)://``), via fsspec.

Every read and write of a shard directory goes through a ``ShardStore``, so the reader, the writer and
``verify`` do not care where the shards are. What differs is only what each kind of storage can promise:

- A local directory keeps clsp's file discipline: files are written under a temporary name and renamed
  into place, temporaries of dead writers are removed, and the manifest is updated under an ``flock``.
- An object store has no rename and no lock, but a PUT is atomic: a shard is written to a local temporary
  file and uploaded as one object, so no partial object is ever visible under its final name.
- ``http(s)://`` is read-only.

The filesystem is resolved per process (fsspec's instances are not fork-safe, and DataLoader workers are
forks), and errors of the storage client (a missing extra, missing credentials, an unreachable endpoint,
an HTTP status) become one-line ``UserError``s naming the location. Only the protocols above (and
``simplecache::`` chained before one of them) are accepted: fsspec knows many more (``memory://``, whose
"shards" vanish with the process, ``ftp://``, ``github://``, ...) that clsp does not promise anything for.
Remote requests time out after ``CLSP_STORAGE_TIMEOUT`` seconds (default 60): a question about a file (does it
exist, how large is it) is answered within that time in all, whatever the client retries (fsspec's HTTP client
asks with HEAD, then with GET); a download may take longer, but waits at most that long to connect and between
reads.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from clsp.errors import UserError
from clsp.io import (
    atomic_file,
    exclusive_lock,
    explained_write,
    missing_directories,
    remove_stale_temporaries,
    write_bytes_atomic,
)

SPOOL_BYTES = 64 << 20  # a downloaded shard is kept in memory up to this size, then in a temporary file
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_READ_ONLY = ("http", "https")
_ALLOWED = ("file", "s3", "s3a", "gs", "gcs", "http", "https")  # the last link of a chain; before it only _CACHE
_CACHE = "simplecache"
_ACCEPTED = "a local directory or one of file://, s3://, gs://, http://, https:// (optionally after simplecache::)"
TIMEOUT_VARIABLE = "CLSP_STORAGE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
_NO_BUCKET = "create the bucket first; clsp writes into it but does not create it"
_ONE_SLASH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")  # "s3:/bucket": a URL missing a slash
_IPV6_GAP = re.compile(r"\[[0-9A-Fa-f:.]*::")  # "http://[::1]:8000": an IPv6 address written with "::"
# Exception classes of the storage clients, by name: they are optional dependencies, never imported here.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectionError",
                "ConnectionError", "TimeoutError", "FSTimeoutError"}


def _is_url(location: str) -> bool:
    return "://" in location


def _protocols(location: str) -> list[str]:
    """The protocols of a possibly chained URL (``simplecache::s3://b/k`` -> [simplecache, s3])."""
    return [part.split("://", 1)[0] for part in location.split("::") if "://" in part]


def _credentials_hint(location: str) -> str:
    if {"s3", "s3a"} & set(_protocols(location)):
        return ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
                "S3-compatible server")
    if {"gs", "gcs"} & set(_protocols(location)):
        return "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
    if _is_url(location) and not location.startswith("file://"):
        return "check the credentials"
    return "check the file permissions"


def _endpoint_hint(location: str) -> str:
    if {"s3", "s3a"} & set(_protocols(location)):
        return "check the URL and the endpoint (AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL for S3-compatible servers)"
    return "check the URL and the network"


def _invalid_url(error: BaseException, where: str) -> UserError:
    return UserError(f"{where} is not a valid URL ({' '.join(str(error).split())[:200] or type(error).__name__}): "
                     f"check it")


def _translate(error: BaseException, where: str) -> UserError | None:
    """The one-line UserError for a storage client's error, or None when it is not one clsp explains."""
    if isinstance(error, UserError):
        return None
    names = {cls.__name__ for cls in type(error).__mro__}
    detail = " ".join(str(error).split())[:200]
    if "ClientResponseError" in names:  # aiohttp's answer with an HTTP status (http(s):// locations)
        if "TooManyRedirects" in names:
            return UserError(f"too many redirects from {where} (a redirect loop?): check the URL")
        return UserError(f"HTTP {getattr(error, 'status', '?')} from {where}: check the URL and the server")
    if names & {"InvalidURL", "InvalidUrlClientError", "NonHttpUrlClientError"}:
        return _invalid_url(error, where)
    if names & {"ServerTimeoutError", "ConnectTimeoutError", "ReadTimeoutError", "FSTimeoutError"} \
            or isinstance(error, TimeoutError):
        return UserError(f"no answer from {where} within {timeout_s():g} s: check the URL and the network, or "
                         f"set {TIMEOUT_VARIABLE} (seconds) higher")
    if names & _NO_CREDENTIALS:
        return UserError(f"no credentials to reach {where}: {_credentials_hint(where)}")
    if isinstance(error, PermissionError):
        return UserError(f"access denied to {where} ({detail}): {_credentials_hint(where)}")
    if names & _UNREACHABLE:
        return UserError(f"cannot reach {where} ({detail or type(error).__name__}): {_endpoint_hint(where)}")
    if isinstance(error, OSError) and error.errno is None and _is_url(where) \
            and not isinstance(error, FileNotFoundError):  # the store's own answer, e.g. a server error
        return UserError(f"{where}: {detail or type(error).__name__}")
    return None


@contextmanager
def _explained(where: str, missing: str | None = None) -> Iterator[None]:
    """Turn a storage client's error inside the block into a one-line UserError naming ``where``; with
    ``missing``, a FileNotFoundError too (a write into a bucket that does not exist), with that advice."""
    try:
        yield
    except Exception as error:  # only the errors _translate recognises are replaced
        if missing is not None and isinstance(error, FileNotFoundError):
            raise UserError(f"cannot write {where} ({' '.join(str(error).split())[:200]}): {missing}") from None
        translated = _translate(error, where)
        if translated is None:
            raise
        raise translated from None


def timeout_s() -> float:
    """``CLSP_STORAGE_TIMEOUT``: seconds a question about a remote file may take in all, and a download to connect
    and between bytes read."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:
        raise UserError(f"{TIMEOUT_VARIABLE}={text[:40]!r} is not a number of seconds in (0, 86400]; unset it for "
                        f"the default of {DEFAULT_TIMEOUT_S:g}")
    return value


def _client_options(protocols: list[str]) -> dict[str, dict]:
    """fsspec options, keyed by protocol, that bound every request of the storage clients in ``protocols``."""
    seconds = timeout_s()
    options: dict[str, dict] = {}
    for protocol in protocols:
        if protocol in ("http", "https"):
            from aiohttp import ClientTimeout

            options[protocol] = {"client_kwargs": {"timeout": ClientTimeout(total=None, sock_connect=seconds,
                                                                            sock_read=seconds)}}
        elif protocol in ("s3", "s3a"):
            options[protocol] = {"config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds}}
    return options


def _chain(location: str) -> list[str]:
    """The protocols of a location's chain as fsspec reads them ("file" for a local path); UserError for any
    outside the allow-list, before fsspec creates (and for some protocols, contacts) anything."""
    if _IPV6_GAP.search(location):  # fsspec reads every "::" as a link of a chain, also inside an address
        raise UserError(f"{location[:200]!r}: '::' inside an IPv6 address is read as a chain of protocols; write the "
                        f"address in full (e.g. [0:0:0:0:0:0:0:1] for [::1]) or use a host name such as localhost")
    *links, target = location.split("::")
    protocols = [split_protocol(link if "://" in link else f"{link}://")[0] for link in links]
    protocols.append(split_protocol(target)[0] or "file")
    if any(p != _CACHE for p in protocols[:-1]) or protocols[-1] not in _ALLOWED:
        raise UserError(f"unknown storage protocol in {location[:200]!r}: use {_ACCEPTED}")
    return protocols


def _filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, root)`` of a location; UserError for a bad URL, a protocol outside the allow-list or one whose
    extra is not installed."""
    if _ONE_SLASH.match(location):
        protocol, _, path = location.partition(":")
        meant = f"{path!r} (or 'file://{path}')" if protocol == "file" else repr(f"{protocol}:/{path}")
        raise UserError(f"{location[:200]!r} looks like a URL with one slash after the protocol; write {meant[:200]}, "
                        f"or ./{location[:200]} for a local directory")
    protocols = _chain(location)
    try:
        fs, root = url_to_fs(location, **_client_options(protocols))
    except UserError:
        raise
    except ImportError:
        protocol = next((p for p in _protocols(location) if p in _EXTRAS), _protocols(location)[-1])
        extra = _EXTRAS.get(protocol, protocol)
        raise UserError(f"{protocol}:// locations need an optional dependency: pip install 'clsp[{extra}]'") from None
    except ValueError as error:
        raise UserError(f"{location[:200]!r} is not a valid location ({str(error)[:200]})") from None
    if not isinstance(fs, LocalFileSystem) and not root.strip("/"):
        raise UserError(f"{location!r} names no bucket or host; write e.g. s3://bucket/shards")
    return fs, root.rstrip("/")


@dataclass(frozen=True)
class ShardStore:
    """A shard directory's location, as given (a local path or a URL), and the operations on its files."""

    location: str

    @classmethod
    def open(cls, location: str | os.PathLike | ShardStore) -> ShardStore:
        """The store at ``location``; a bad URL or a missing extra is refused here, before any work."""
        if isinstance(location, ShardStore):
            return location
        store = cls(os.fspath(location))
        store._resolved()
        return store

    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        # fsspec caches instances per process, so this is cheap and fork-safe
        with _explained(self.location):
            return _filesystem(self.location)

    @property
    def local(self) -> bool:
        """A local directory: renames, locks and temporaries work there; object stores need other means."""
        return isinstance(self._resolved()[0], LocalFileSystem)

    @property
    def read_only(self) -> bool:
        return any(p in _READ_ONLY for p in _protocols(self.location))

    def where(self, name: str) -> str:
        """A file of the directory as messages name it (the location as the user wrote it)."""
        if _is_url(self.location):
            return f"{self.location.rstrip('/')}/{name}"
        return str(Path(self.location) / name)

    def _path(self, name: str) -> str:
        return f"{self._resolved()[1]}/{name}"

    def _local(self, name: str) -> Path:
        return Path(self._resolved()[1]) / name

    def _info(self, path: str, where: str) -> dict | None:
        """fsspec's info of ``path``, None when absent; unlike ``fs.isfile``, an unreachable store is an error."""
        fs = self._resolved()[0]
        deadline = {"timeout": timeout_s()} if isinstance(fs, AsyncFileSystem) else {}  # the whole question, retries
        with _explained(where):
            try:
                return fs.info(path, **deadline)
            except FileNotFoundError as missing:  # fsspec's HTTP client reports a refused connection so
                cause = missing.__cause__
                if type(cause) is ValueError:  # what the HTTP client's URL parser raises, e.g. for port 99999
                    raise _invalid_url(cause, where) from None
                if cause is not None and _translate(cause, where) is not None:
                    raise cause from None
                return None

    def probe(self) -> None:
        """One request, so that missing credentials or an unreachable endpoint are reported before any work."""
        self._info(self._resolved()[1], self.location)

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""
        info = self._info(self._path(name), self.where(name))
        return info is not None and info["type"] == "file"

    def read_bounded(self, name: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of a file: enough for ``schema.parse_json`` to refuse an oversized one."""
        fs = self._resolved()[0]
        with _explained(self.where(name)), fs.open(self._path(name), "rb") as stream:
            return stream.read(limit + 1)

    def read_each(self, names: list[str], limit: int) -> dict[str, bytes]:
        """The first ``limit + 1`` bytes of each file that exists (fetched concurrently from object stores)."""
        if not names:
            return {}
        fs = self._resolved()[0]
        with _explained(self.where(names[0])):
            results = fs.cat_ranges([self._path(n) for n in names], [0] * len(names), [limit + 1] * len(names),
                                    on_error="return")
        found = {}
        for name, result in zip(names, results):
            if isinstance(result, FileNotFoundError):
                continue
            if isinstance(result, BaseException):
                raise _translate(result, self.where(name)) or result
            found[name] = result[:limit + 1]  # a server that ignores the range sends the whole file
        return found

    def names(self, pattern: str) -> list[str]:
        """Names of the files matching a glob ``pattern``, sorted."""
        fs, root = self._resolved()
        with _explained(self.where(pattern)):
            found = fs.glob(f"{root}/{pattern}")
            fs.invalidate_cache(root)  # other writers add objects at any time: never answer from a stale listing
        return sorted(path.rsplit("/", 1)[-1] for path in found)

    @contextmanager
    def fetched(self, name: str) -> Iterator[IO[bytes]]:
        """A seekable binary file with the file's bytes: the local file itself, or one download of the object.

        One download serves both the checksum and the parse, so exactly the bytes that were checked are read.
        """
        fs = self._resolved()[0]
        with _explained(self.where(name)):
            if self.local:
                with fs.open(self._path(name), "rb") as stream:
                    yield stream
                return
            with fs.open(self._path(name), "rb") as source, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
                copy.seek(0)
                yield copy

    # ---- writing ---------------------------------------------------------------------------------------
    def require_writable(self) -> None:
        """Refuse a read-only location (before any work is done for it)."""
        if self.read_only:
            raise UserError(f"{self.location} is read-only (http and https serve shards, they do not store them); "
                            f"write to a local directory, s3:// or gs://")
        if _CACHE in _chain(self.location)[:-1]:  # its writes land in a local cache, not at the location
            target = self.location.split("::")[-1]
            raise UserError(f"{self.location[:200]}: {_CACHE}:: keeps a local copy of what is read and cannot be "
                            f"written through; write to {target[:200]} itself")

    def lock(self, name: str):
        """An exclusive lock on file ``name`` of a local directory; object stores have none (they need none:
        their per-shard records, each one object, are the source of truth)."""
        return exclusive_lock(self._local(name)) if self.local else nullcontext()

    def remove_stale(self, pattern: str = "*") -> None:
        """Remove temporaries of dead local writers; an object store never holds a partial object."""
        if self.local:
            remove_stale_temporaries(self._resolved()[1], pattern)

    @contextmanager
    def writing(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file (readable too) that becomes ``name`` whole, only if the block succeeds."""
        if self.local:
            with atomic_file(self._local(name)) as stream:
                yield stream
            return
        fs = self._resolved()[0]
        with tempfile.NamedTemporaryFile(prefix=f".{name}.", suffix=".upload") as stream, \
                explained_write(stream.name):  # the local spool, on the temporary directory's disk
            yield stream
            stream.flush()
            with _explained(self.where(name), missing=_NO_BUCKET):
                fs.put_file(stream.name, self._path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file atomically (a rename locally, one PUT on an object store)."""
        if self.local:
            write_bytes_atomic(self._local(name), data)
            return
        fs = self._resolved()[0]
        with _explained(self.where(name), missing=_NO_BUCKET):
            fs.pipe_file(self._path(name), data)

    def remove(self, names: list[str]) -> None:
        if not names:
            return
        fs = self._resolved()[0]
        with _explained(self.where(names[0])):
            fs.rm([self._path(n) for n in names])

    def missing_directories(self) -> list[Path]:
        """The local directory and those of its parents that do not exist yet, deepest first ([] for object
        stores): what writing into it will create."""
        return missing_directories(self._resolved()[1]) if self.local else []


def exists(location: str | os.PathLike) -> bool:
    """Whether a file exists, given as a local path or a URL (for outputs that may live on object storage)."""
    text = os.fspath(location)
    if not _is_url(text):
        return Path(text).exists()
    directory, _, name = text.rstrip("/").rpartition("/")
    return ShardStore.open(directory).exists(name)
