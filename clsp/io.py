"""Atomic file writes, locks and temporaries that are safe when several processes share a directory.

Every file another stage reads appears complete or not at all: it is written under a temporary name
``.<name>.<random>.tmp-<pid>@<host>`` and renamed into place. The name says which process owns it, so a
temporary is removed only once its writer is dead (``remove_stale_temporaries``), never while another
job is still writing it. Locks and temporaries are opened without following symlinks. A write that fails
(a full disk, a quota, ``ulimit -f``) is one ``UserError`` naming the file: its temporary is removed and
the file it would have replaced is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from clsp.errors import LockError, UserError, short_path

_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_OWNER = re.compile(r"\.tmp-(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)$")


def _temporary_suffix() -> str:
    """The owner tag of this process's temporaries (read back by ``remove_stale_temporaries``)."""
    return f".tmp-{os.getpid()}@{_HOST}"


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A fresh temporary beside ``path``: O_EXCL creation, so a planted file or symlink is never reused."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_temporary_suffix(), dir=path.parent)
    return fd, Path(tmp)


def check_creatable(directory: str | os.PathLike) -> None:
    """Refuse, before any work, a directory that cannot be made because an existing part of it is a file or a
    symbolic link to nothing."""
    for part in (Path(directory), *Path(directory).parents):
        if part.is_symlink() and not part.exists():  # mkdir would fail on it later, after work (see one_line)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(part))
        if part.exists():
            if not part.is_dir():
                raise UserError(f"{part} is a file, not a directory; choose another path")
            return


def missing_directories(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what writing there would create."""
    return [part for part in (Path(path), *Path(path).parents) if not part.exists()]


def remove_empty_directories(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty: what a refused run created and left unused."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (or gone): something else lives there
            folder.rmdir()


# A write that fails for lack of room or for a size limit: what a full disk, a quota or `ulimit -f` gives.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_WRITE_ERRNOS = _NO_ROOM | {errno.EIO, errno.EROFS}
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report the errno


def _write_errno(error: BaseException) -> int | None:
    """The errno of a failed write behind ``error``: the OSError itself, one a library raised its own error over
    (torch's zip writer), or a Rust writer's "(os error N)"; None for anything that is not a failed write."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.filename is None and seen.errno in _WRITE_ERRNOS:
            return seen.errno
        found = _OS_ERROR_TEXT.search(str(seen)) if not isinstance(seen, OSError) else None
        if found and int(found[1]) in _WRITE_ERRNOS:
            return int(found[1])
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def explained_write(path: str | os.PathLike) -> Iterator[None]:
    """A failed write inside the block as one UserError naming ``path`` (the file that was not written)."""
    try:
        yield
    except Exception as error:  # only failed writes are replaced, the rest pass unchanged
        code = _write_errno(error)
        if code is None:
            raise
        fix = ("free space, raise the file-size limit (ulimit -f) or choose another path" if code in _NO_ROOM
               else "check the disk or choose another path")
        raise UserError(f"cannot write {path} ({os.strerror(code)}); it is unchanged: {fix}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    For writers that need a path (``torch.save``); ``atomic_file`` is safer where a file object will do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = _new_temporary(path)
    os.close(fd)
    try:
        with explained_write(path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; shared shard dirs need the usual mode
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file (readable too) that becomes ``path`` (flushed and fsynced) only if the block succeeds.

    The file object is the one ``mkstemp`` created, so nothing is reopened by name in between.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = _new_temporary(path)
    try:
        with explained_write(path):
            with os.fdopen(fd, "w+b") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
                os.fchmod(stream.fileno(), 0o666 & ~_UMASK)
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as stream:
        stream.write(data)


def json_bytes(obj: Any) -> bytes:
    """The one JSON layout of clsp's files: indented, sorted keys, a final newline (stable bytes, readable diffs)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def save_torch_atomic(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a checkpoint of tensors and plain Python values (loadable with ``weights_only=True``)."""
    with atomic_file(path) as stream:
        torch.save(state, stream)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_checkpoint(path: str | os.PathLike, fix: str) -> Any:
    """A regular file's checkpoint, loaded without unpickling arbitrary objects; a file that is not one (text, a
    pickle of objects, a truncated zip) is one UserError with torch's reason in a few words, then ``fix``."""
    path = regular_file(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = " ".join(str(err).split())
        reason = text.partition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0] or text
        raise UserError(f"cannot read {path} as a PyTorch checkpoint of tensors "
                        f"({reason.strip()[:80] or type(err).__name__}); {fix}") from None


def load_weights(module: torch.nn.Module, state: Mapping[str, Any], where: str | os.PathLike, fix: str) -> None:
    """``module.load_state_dict(state)``, strict; a mismatch is one UserError naming the first tensors that are
    missing, unexpected or of another shape (torch's own message lists every key over many lines)."""
    own = module.state_dict()
    problems = [f"{name[:60]} missing" for name in own if name not in state]
    problems += [f"{name[:60]} unexpected" for name in state if name not in own]
    problems += [f"{name[:60]} is {list(state[name].shape)} there, {list(tensor.shape)} here" for name, tensor in
                 own.items() if name in state and getattr(state[name], "shape", tensor.shape) != tensor.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"the weights in {where} do not fit: {'; '.join(problems[:3])}{more}; {fix}")
    module.load_state_dict(state)


def file_digest(source: str | os.PathLike | IO[bytes]) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, or of an open binary file from its start; read in blocks."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _digest(f)
    source.seek(0)
    return _digest(source)


def _digest(stream: IO[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def _alive(pid: int) -> bool:
    """Whether a process of this id exists on this host (one we may not signal still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Remove the temporaries of files (or staged folders) matching ``pattern`` whose writer process is dead;
    return them.

    Only temporaries written on this host by a pid that no longer exists are removed: those of live
    writers (another job in the same directory) and of other hosts (a shared filesystem) are kept.
    Call it at start, e.g. ``remove_stale_temporaries(out, "checkpoint*.pt")``.
    """
    removed = []
    for tmp in Path(directory).glob(f".{pattern}.*.tmp-*"):
        owner = _OWNER.search(tmp.name)
        if owner and owner["host"] == _HOST and not _alive(int(owner["pid"])):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path`` (owner-tagged like every temporary); rename it onto ``path``
    only if the block succeeds, so a folder of several files appears complete or not at all. Staged folders
    left by killed writers are removed first. ``path`` must not exist, or be an empty folder; a symbolic link
    to one stands for its target (a rename cannot replace the link with a folder)."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise UserError(f"{short_path(path)} is a symbolic link to nothing; remove it, or point it at a directory")
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    staging = path.parent / f".{path.name}.staged{_temporary_suffix()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()  # mkdir, unlike mkdtemp, keeps the umask's mode
    try:
        with explained_write(path):
            yield staging
            staging.replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file (after links); else one UserError: a pipe or a device would block or
    never end a read."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        raise UserError(f"{what} {path} does not exist; check the path") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UserError(f"{what} {path} is {kind}; pass a regular file (only regular files are read)")
    return path


def _open_lock(path: Path) -> int:
    """The descriptor of lock file ``path`` (created if absent); a symlink there is refused, not followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~_UMASK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LockError(f"the lock file is a symbolic link ({path}): remove it; clsp never follows links "
                            f"for its locks") from None
        raise


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent); a symlink there is refused, not followed."""
    fd = _open_lock(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def owned_lock(path: str | os.PathLike, waiting: Callable[[str], object]) -> Iterator[None]:
    """``exclusive_lock`` for long work: the holder writes its pid into the file, and a second process first
    calls ``waiting`` with a line naming that pid (so a user sees why nothing happens), then waits."""
    fd = _open_lock(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "another process"
            waiting(f"waiting for process {holder}, which holds {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{_HOST}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
