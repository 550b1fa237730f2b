"""``resume=<run dir>``: continue a stopped run in its own directory, from its last checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from datamodules.errors import UserError

log = logging.getLogger("run")


def resume_argv(argv: list[str]) -> list[str]:
    """Turn ``resume=<run dir>`` into the overrides that continue that run where it stopped.

    The run's own overrides (``.hydra/overrides.yaml``) come first, so the composed config is
    the original one; overrides given now come after them and win. The run continues in its own
    directory from ``checkpoints/last.ckpt``; nothing already written is replaced: this launch's
    Hydra files go to ``.hydra/resume-<time>/``, its CSV metrics to ``csv/resume-<time>/``.
    """
    given = [a for a in argv[1:] if a.startswith("resume=")]
    if not given:
        return argv
    import yaml

    run_dir = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file() or not last.is_file():
        raise UserError(
            f"Cannot resume '{run_dir}': it needs .hydra/overrides.yaml and "
            "checkpoints/last.ckpt. Give the directory of a training run that saved a checkpoint."
        )
    fixed = ("resume=", "ckpt_path=", "hydra.run.dir=", "hydra.output_subdir=")
    original = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.startswith(fixed)]
    now = [a for a in argv[1:] if not a.startswith(fixed)]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    extra = [
        f"hydra.run.dir={run_dir}",
        f"hydra.output_subdir=.hydra/resume-{stamp}",
        f"ckpt_path={last}",
    ]
    if (run_dir / "csv").is_dir():
        extra.append(f"logger.csv.version=resume-{stamp}")
    log.info("Resuming %s from %s", run_dir, last)
    return [argv[0], *original, *now, *extra]
