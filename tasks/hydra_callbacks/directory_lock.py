"""Hydra callback: one launch at a time per sweep (or run) directory.

Two multiruns into one sweep directory at once would train the same members twice, overwrite
each other's checkpoints and leave jobs with both ``metrics.json`` and ``failed.json``. At the
start of a multirun (a single run: of the run) this callback creates ``<dir>/.lock``
atomically (``O_CREAT | O_EXCL``), holding the owner's host, pid, start time and command; it is
removed when the launch ends, also after an error (``atexit``). A second launch is refused with
one line naming the holder. A lock left behind by a launch that died is stale: on the same host
its pid is no longer alive, and the lock is taken over with a warning; on another host it cannot
be checked, so the message says which file to delete once that launch is known to be gone.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def acquire(folder: Path) -> Path:
    """Take ``folder/.lock``, or exit with status 2 and one line naming its holder (or why the
    folder cannot be written: the first place a launch writes to it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _cannot_write(folder, err)
    path = folder / LOCK_FILE
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
    }
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning(
                    "Taking over the stale lock %s of pid %s (no longer running).",
                    path,
                    holder["pid"],
                )
                path.unlink(missing_ok=True)
                continue
            where = "" if same_host else f"on host {holder.get('host')} "
            print(
                f"Error: '{folder}' is in use by another launch (pid {holder.get('pid')} "
                f"{where}since {holder.get('since')}: {holder.get('command', '?')[:120]}): wait "
                f"for it to end, or use another directory; if that launch is gone, delete {path}.",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        except OSError as err:  # read-only mount, no permission
            _cannot_write(folder, err)
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        atexit.register(release, path)
        return path
    raise SystemExit(2)


def _cannot_write(folder: Path, err: OSError):
    print(
        f"Error: Cannot write to '{folder}' ({err.strerror or err}): set paths.log_dir (or "
        "hydra.run.dir / hydra.sweep.dir) to a folder you can write to.",
        file=sys.stderr,
    )
    raise SystemExit(2) from None


def release(path: Path) -> None:
    """Remove ``path`` if this process holds it."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _rank_zero() -> bool:
    from tasks.tracking import is_rank_zero

    return is_rank_zero()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class DirectoryLock(Callback):
    """Holds ``.lock`` in the sweep directory (or run directory) while a launch runs."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():  # DDP's other ranks re-run the command: the launch is rank 0's
            self.path = acquire(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.path is not None:
            release(self.path)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            self.path = acquire(Path(str(config.hydra.run.dir)))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.path is not None:
            release(self.path)
