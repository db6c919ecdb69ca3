"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then a rename.

Readers see the old file or the new one, never half of one; after a crash of the machine, a
file written before another (a site's saved update before the ledger line that names it) is on
disk whenever the later one is.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (fsync of the file before the rename, of the folder after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename lives in the folder: fsync it too, or a crash of the machine may forget it.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` with :func:`write_bytes`."""
    import torch  # only the writers of tensors pay for it

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())
