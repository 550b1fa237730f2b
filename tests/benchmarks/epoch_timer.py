"""A callback for ``bench_overhead.py``: the same timestamps in a project run as ``bare_loop.py``
records (wall-clock time of the first training step, each epoch from its start to the end of its
last optimizer step, and the images trained on per epoch), written to a JSON file after every epoch.

    python run.py +callbacks.epoch_timer._target_=tests.benchmarks.epoch_timer.EpochTimer \
        +callbacks.epoch_timer.path=times.json
"""

from __future__ import annotations

import json
import time

from pytorch_lightning import Callback


class EpochTimer(Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.record = {"first_step": None, "epochs": [], "n_train": 0}
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.record["first_step"] is None:
            self.record["first_step"] = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()
        self._images += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.record["epochs"].append(self._last - self._start)
        self.record["n_train"] = self._images
        with open(self.path, "w") as f:
            json.dump(self.record, f)
