"""Writing files so that readers and concurrent writers never see a partial one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a fresh temporary file beside `path`, fsync it, then rename it over
    `path`. The temporary name is unique (mkstemp), so two processes writing the same file
    (a shared cache, two ranks) each replace it whole and neither loses its temporary file;
    on any error the temporary file is removed and `path` keeps its old content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
