"""A callback for ``bench_overhead.py``: the same timestamps in a project run as ``bare_loop.py``
records, written to a JSON file after every epoch and once more when the interpreter exits.

    python run.py +callbacks.epoch_timer._target_=tests.benchmarks.epoch_timer.EpochTimer \
        +callbacks.epoch_timer.path=times.json

Recorded (wall-clock ``time.time()`` for instants, seconds for durations):
``first_step`` (the first training batch starts), ``epochs`` (each epoch from its start to the end
of its last optimizer step), ``n_train`` (images trained on per epoch), and the phases that
``bench_overhead.phases`` turns into a breakdown: ``sanity`` (the sanity-check validation),
``val`` (validation, summed over epochs), ``checkpoints`` (from this callback's end of the epoch
to the start of the next or the end of fit: the checkpoint and early-stopping callbacks run there,
after every other callback's ``on_train_epoch_end``), ``fit_end``,
``test_start``, ``test_end`` and ``exit`` (the interpreter starts shutting down: atexit).
"""

from __future__ import annotations

import atexit
import json
import time

from pytorch_lightning import Callback


class EpochTimer(Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.record = {
            "first_step": None,
            "epochs": [],
            "n_train": 0,
            "sanity": 0.0,
            "val": 0.0,
            "checkpoints": 0.0,
        }
        self._start = self._last = self._mark = 0.0
        self._epoch_end = None
        atexit.register(self._at_exit)

    def _now(self, key: str) -> None:
        self.record[key] = time.time()
        self._write()

    def _write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.record, f)

    def _at_exit(self) -> None:
        self._now("exit")

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.record["sanity"] += time.perf_counter() - self._mark

    def _checkpoints_done(self) -> None:
        if self._epoch_end is not None:
            self.record["checkpoints"] += time.perf_counter() - self._epoch_end
            self._epoch_end = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._checkpoints_done()
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.record["first_step"] is None:
            self.record["first_step"] = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()
        self._images += len(batch[0])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._mark = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.record["val"] += time.perf_counter() - self._mark

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # the checkpoint callbacks save in their on_train_epoch_end, which Lightning calls after
        # every other callback's (validation ran once, at the end of the epoch)
        self._epoch_end = time.perf_counter()
        self.record["epochs"].append(self._last - self._start)
        self.record["n_train"] = self._images
        self._write()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._checkpoints_done()
        self._now("fit_end")

    def on_test_start(self, trainer, pl_module) -> None:
        self._now("test_start")

    def on_test_end(self, trainer, pl_module) -> None:
        self._now("test_end")
