"""Run a list of ``python run.py`` commands one after another, as a user would, in one process.

    python tests/command_runner.py <plan.json> <results.json>     (cwd: the user's folder)

Each command runs ``run.py`` of the current folder with its own ``sys.argv`` and environment, its
output going to its own log file; a command whose launcher starts processes of its own (DDP,
joblib) runs as a real subprocess. One process for all saves the ~7 s of imports per command
that a subprocess each would cost; Hydra's own basic launcher runs the jobs of a multirun the
same way. Writes, per command: exit code, seconds, log file and the run/sweep directories that
appeared under ``outputs/``.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _run_dirs() -> set[str]:
    out = Path("outputs")
    found = {str(p) for p in out.glob("*/runs/*")} | {str(p) for p in out.glob("*/multiruns/*")}
    return found | ({str(p) for p in out.glob("*/*")} if out.exists() else set())


def _in_process(argv: list[str]) -> int:
    from hydra.core.global_hydra import GlobalHydra

    sys.argv = ["run.py", *argv]
    try:
        runpy.run_path("run.py", run_name="__main__")
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # noqa: BLE001 - a traceback is the command's outcome, not ours
        traceback.print_exc()
        return 1
    finally:
        GlobalHydra.instance().clear()


def run_one(command: dict, log: Path) -> dict:
    before, saved_env = _run_dirs(), dict(os.environ)
    os.environ.update(command["env"])
    # what an unquoted word gets from the shell: $VAR expanded (a ~ inside a word is left as is)
    argv = [os.path.expandvars(a) for a in command["argv"]]
    start = time.perf_counter()
    with log.open("w") as out:
        if command.get("module"):  # python -m tests.<module> ...
            rc = subprocess.run(
                [sys.executable, "-m", command["module"], *argv], stdout=out, stderr=out
            ).returncode
        elif command["subprocess"]:
            rc = subprocess.run(
                [sys.executable, "run.py", *argv], stdout=out, stderr=out
            ).returncode
        else:
            sys.stdout.flush(), sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
            try:
                rc = _in_process(argv)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
    seconds = time.perf_counter() - start
    os.environ.clear()
    os.environ.update(saved_env)
    return {
        "rc": rc,
        "seconds": round(seconds, 2),
        "log": str(log),
        "new_dirs": sorted(_run_dirs() - before),
    }


def main(plan: Path, results: Path) -> None:
    sys.path.insert(0, os.getcwd())  # as `python run.py` does: the script's folder first
    commands = json.loads(plan.read_text())
    logs = results.resolve().parent / "logs"  # absolute: the test reads them from elsewhere
    logs.mkdir(exist_ok=True)
    done = []
    for i, command in enumerate(commands):
        done.append({**command, **run_one(command, logs / f"{results.stem}-{i:02d}.log")})
        results.write_text(json.dumps(done, indent=1))  # what ran so far, if a later one hangs


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
