"""Files that appear whole or not at all: caches written under a temporary name, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Write ``path`` through a temporary file beside it, renamed over ``path`` when the block
    ends without an error (``os.replace``: a reader sees the old file or the new one, never half
    of one) and removed when it raises. The temporary name is unique, so processes writing the
    same file at once do not mix their bytes; the file ends up readable like any other (0644).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp's files are private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
