"""Writing files so that readers and concurrent writers never see a partial one: each is filled
under a temporary name beside its target (`.NAME.XXXXXXXX`, the pattern of tempfile.mkstemp),
then renamed over it; a write that cannot happen is a one-line DataError saying why and what to
do, and the temporary files of writes killed midway can be swept away. Folders are locked
against a second writer, and downloads arrive the same way, whole and checked, or not at all.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import hashlib
import http.client
import os
import re
import secrets
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from canon.errors import CanonError, DataError

# `.NAME.` plus mkstemp's eight characters, so leftovers of older canon versions match too.
_PARTIAL_WRITE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A temporary file unmodified this long is a killed write's, even in a folder other processes
# write in (a shared cache): a live write, a download included, changes it more often.
STALE_SECONDS = 24 * 3600
LOCK_FILE = ".lock"
CACHE_ADVICE = "choose a writable cache folder with room for it (--cache or CANON_CACHE)"


def atomic_write(
    path: Path, write: Callable[[Path], None], *, advice: str = "choose a writable folder"
) -> None:
    """Let `write` fill a fresh temporary file beside `path`, fsync it, then rename it over
    `path`. The temporary name is unique, so two processes writing the same file (a shared
    cache, two ranks) each replace it whole and neither loses its temporary file; on any error
    the temporary file is removed and `path` keeps its old content. The file gets the mode
    open(path, "w") would give it. An OSError (unwritable folder, full disk) becomes a
    DataError naming `path`, the reason and `advice`. Temporary files of `path` that killed
    writes left (STALE_SECONDS old) are deleted first: a statistics pass or a linear probe's
    features killed midway would otherwise leave gigabytes in a cache for good."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_temporaries(path)
        temporary = _new_temporary(path)
    except OSError as error:
        raise cannot_write(path, error, advice) from None
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, CanonError):
            raise cannot_write(path, error, advice) from None
        raise


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` survive a power loss (POSIX syncs a folder's entries
    through its descriptor). Where a folder cannot be opened or synced so (Windows, some
    network file systems), the file is written all the same: its own fsync is all there is."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def check_output_file(path: Path, option: str, kind: str, is_kind: Callable[[Path], bool]
                      ) -> None:
    """Before any work: `path` (given as `option`) can take the output, replacing only an
    earlier output of the same `kind` (`is_kind` tells); a folder there or in place of its
    parent, another file (a run's weights, the user's), or a folder canon cannot write in
    is a DataError naming it."""
    if path.is_dir():
        raise DataError(f"{option} {path} is a folder; name a file in it")
    if path.exists() and not is_kind(path):
        raise DataError(f"{option} {path} exists and is not {kind}: choose another {option} "
                        "(canon replaces only its own output)")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(f"{option} {path}: {parent} is a file, not a folder")
    if parent is not None:  # a file made and deleted: permissions alone do not tell (root)
        try:
            _new_temporary(parent / path.name).unlink()
        except OSError as error:
            raise DataError(f"{option} {path}: cannot write in {parent} ({error.strerror}); "
                            f"choose another {option}") from None


def make_folder(folder: Path, *, advice: str = "choose a writable folder") -> None:
    """mkdir -p `folder`; DataError naming it, the reason and `advice` when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(folder, error, advice) from None


@contextmanager
def locked_folder(folder: Path, *, user: str, other: str, advice: str) -> Iterator[None]:
    """Hold `folder`/.lock for the block, against every other process that asks for it: an
    flock, which the kernel releases when its holder dies, so a killed holder never blocks the
    next. The file names its holder, `user` (e.g. "canon run"), pid and machine. Held
    elsewhere: a DataError, "`folder` is in use by another `user` (pid N[ on HOST]); wait for
    it or `other`";
    the lock file cannot be made: cannot_write's, with `advice`; nor locked: a DataError."""
    path = folder / LOCK_FILE
    descriptor = _lock(path, user, other, advice)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked here: a waiting opener sees it went (_lock)
        os.close(descriptor)


def folder_holder(folder: Path) -> str | None:
    """Who holds `folder`'s lock now (locked_folder), as "canon run (pid N[ on HOST])"; None
    where no one does, or its lock cannot be looked at."""
    try:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(descriptor)
    except OSError:  # a file system without locks: nothing is held
        return None
    finally:
        os.close(descriptor)
    return None


def _holder(descriptor: int) -> str:
    """"USER (pid N)" as a lock file reads, "USER (pid N on HOST)" for a holder on another
    machine (a shared file system), whose pid means nothing here; a file not yet written
    whole, or a killed holder's words on this machine, are not repeated (the new holder has
    locked the file, yet to write its own)."""
    text = os.read(descriptor, 400).decode("utf-8", "surrogateescape")
    held = text.split(maxsplit=1) if text.endswith("\n") else []
    if not held:
        return "canon process (pid unknown)"
    pid, _, host = held[0].partition("@")  # an older canon's file names no host
    user = held[1].strip() if len(held) > 1 else "canon process"  # nor, older still, its user
    if host and host != socket.gethostname():
        return f"{user} (pid {pid} on {host})"
    return f"{user} (pid {pid})" if _alive(pid) else "canon process (pid unknown)"


def _lock(path: Path, user: str, other: str, advice: str) -> int:
    """A descriptor of `path`, exclusively locked and holding this process's pid, machine and
    `user`."""
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise cannot_write(path, error, advice) from None
        try:
            _lock_exclusively(descriptor)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise DataError(f"{path.parent} is in use by another {holder}; wait for it or "
                            f"{other}") from None
        except OSError as error:  # a file system without locks (some NFS or Lustre mounts)
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise DataError(f"cannot lock {path}: {error.strerror or error} (a file system "
                            "without locks, as some network ones), so two processes could write "
                            f"there at once; {other} on a local disk") from None
        if _still_there(descriptor, path):
            os.ftruncate(descriptor, 0)
            # "PID@HOST USER": a holder on another machine of a shared file system is named
            # so, and an older canon reads "pid unknown" (no pid of its own to look up).
            os.write(descriptor, f"{os.getpid()}@{socket.gethostname()} {user}\n".encode(
                "utf-8", "surrogateescape"))
            os.fsync(descriptor)  # what another machine reads meanwhile
            return descriptor
        os.close(descriptor)  # its holder deleted that file as it finished: lock the new one


def _lock_exclusively(descriptor: int) -> None:
    """flock LOCK_EX without waiting for a holder, but for folder_holder's probe, which holds a
    shared lock for microseconds (BlockingIOError once a holder is certain)."""
    for _ in range(5):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.01)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _still_there(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), path.stat())
    except FileNotFoundError:
        return False


def cannot_write(path: Path, error: OSError, advice: str) -> DataError:
    """The one-line DataError for `error`, met writing `path`: the reason and what to do."""
    if error.errno in _DISK_FULL:
        advice = f"free some space or {advice}"
    return DataError(f"cannot write {path}: {_reason(path, error)}; {advice}")


def _reason(path: Path, error: OSError) -> str:
    if isinstance(error, (NotADirectoryError, FileExistsError)):  # a file where a folder goes
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            return f"{blocking} is a file, not a folder"
    return error.strerror or str(error)


def _new_temporary(path: Path) -> Path:
    """A new empty file named like mkstemp's beside `path`, created by the kernel with mode
    0666 less the umask (and the folder's default ACL) as open() does; mkstemp gives 0600."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue  # a name another writer holds (2**-32 odds): draw again


def _sweep_stale_temporaries(path: Path) -> None:
    target = (glob.escape(path.name),)  # its name as a pattern matching itself alone
    for leftover in path.parent.glob(f".{target[0]}.*"):
        try:
            if (_is_partial_write(leftover, target)
                    and time.time() - leftover.stat().st_mtime > STALE_SECONDS):
                leftover.unlink()
        except OSError:  # gone meanwhile, or another user's in a shared cache
            continue


def sweep_partial_writes(folder: Path, targets: tuple[str, ...] = ("*",)) -> list[Path]:
    """Delete the temporary files that writes killed midway left in `folder` and return them:
    regular files named `.NAME.XXXXXXXX` where NAME matches one of the shell patterns
    `targets`, nothing else. Call it only on a folder no other process is writing to (a
    claimed run directory): it would take a live write's file."""
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if _is_partial_write(p, targets)]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def _is_partial_write(path: Path, targets: tuple[str, ...]) -> bool:
    named = _PARTIAL_WRITE.fullmatch(path.name)
    return (
        named is not None and any(fnmatch.fnmatchcase(named["target"], t) for t in targets)
        and path.is_file() and not path.is_symlink()
    )


def printable(name: object) -> str:
    """A file or class name as text any terminal or figure takes: bytes of a name that are
    not UTF-8 (held by Python as surrogates, os.fsdecode's) shown as \\xNN escapes."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Seconds a download waits for the server's next bytes before it fails: urllib's default is
# none, and a proxy or firewall that takes the connection and never answers hangs it for good.
DOWNLOAD_TIMEOUT = 60


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of `path`'s bytes by hashlib's `algorithm`."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str, destination: Path, *, algorithm: str, published: str, name: str, advice: str,
    write_advice: str,
) -> None:
    """Fetch `url` to `destination` (atomic_write, with `write_advice`), with a progress bar
    on a terminal's stderr; its `algorithm` digest must begin with the `published` one (all
    of it, or a prefix such as torch.hub's file names carry; "" checks nothing). What cannot
    be read, a connection cut short included, is a DataError, "cannot download `name` from
    `url` (why)`advice`"; a digest that differs fails too; nothing is kept."""

    def cannot_read(error: object) -> DataError:
        return DataError(f"cannot download {name} from {url} ({error}){advice}")

    def fetch(partial: Path) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "canon"})
        try:
            response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)
        except (OSError, http.client.HTTPException) as error:
            raise cannot_read(error) from None
        # What an HTTP server promised (None when chunked): http.client does not hold it to it.
        promised, received = getattr(response, "length", None), 0
        with (response, open(partial, "wb") as out,
              tqdm(total=promised, unit="B", unit_scale=True, desc=name,
                   disable=None if sys.stderr is not None else True) as bar):
            while True:
                try:
                    block = response.read(1 << 20)
                except (OSError, http.client.HTTPException) as error:
                    raise cannot_read(error) from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if promised is not None and received != promised:
            raise cannot_read(f"cut short at {received} of {promised} bytes")
        actual = file_digest(partial, algorithm)
        if not actual.startswith(published):
            raise DataError(f"{url}: {algorithm} {actual[:len(published)]} does not match the "
                            f"published {published}; try again")

    atomic_write(destination, fetch, advice=write_advice)
