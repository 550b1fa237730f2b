"""Lightning DDP on the CPU (2 processes, gloo) through `python run.py trainer=ddp`.

Progressive unfreezing must keep the ranks identical after an unfreeze boundary (Lightning's own
freeze callbacks let them diverge: DDP only all-reduces parameters that required grad when the
model was wrapped), and only rank 0 may write metrics, predictions and logs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from lightning_modules.layer_groups import layer_groups
from lightning_modules.run_outputs import load_predictions
from tests.conftest import FAST, ONE_THREAD, run_cli

DIGEST = "digest_rank{rank}.json"


class RankDigest(pl.Callback):
    """Test probe: each rank writes a hash of every parameter at fit start and end, the rows of
    the training samples it saw per epoch, and the world size, into ``<run dir>/digest_rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rows: dict[int, list[int]] = {}
        self.start: dict[str, str] = {}

    @staticmethod
    def _hashes(pl_module) -> dict[str, str]:
        return {
            name: hashlib.sha1(p.detach().cpu().numpy().tobytes()).hexdigest()
            for name, p in pl_module.net.named_parameters()
        }

    def on_fit_start(self, trainer, pl_module):
        self.start = self._hashes(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

    def on_fit_end(self, trainer, pl_module):
        groups = layer_groups(pl_module.net)
        info = {
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "rows": self.rows,
            "start": self.start,
            "end": self._hashes(pl_module),
            "groups": {g.name: list(g.param_names) for g in groups},
            "requires_grad": {n: p.requires_grad for n, p in pl_module.net.named_parameters()},
        }
        path = self.out_dir / DIGEST.format(rank=trainer.global_rank)
        path.write_text(json.dumps(info))


def _changed(digest: dict, names: list[str]) -> bool:
    return any(digest["start"][n] != digest["end"][n] for n in names)


@pytest.mark.slow
def test_ddp_multirun_ranks_stay_identical_across_an_unfreeze_and_only_rank0_writes(tmp_path):
    """`python run.py -m seed=1,2 trainer=ddp ...`: two jobs, each with 2 CPU processes; the
    extra rank of each job joins that job (not a sweep of its own) and exits with it."""
    logs = tmp_path / "outputs"
    proc = run_cli(
        "-m",
        "seed=1,2",
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "data.batch_size=16",
        "finetune=progressive",
        "finetune.callback.milestones=[1]",  # layer4 unfreezes at epoch 1: mid-run
        "finetune.callback.group_warmup_epochs=0",
        "model.optimizer.lr=0.01",
        "~callbacks.early_stopping",
        "+callbacks.digest._target_=tests.test_ddp.RankDigest",
        "+callbacks.digest.out_dir=${paths.output_dir}",
        f"paths.log_dir={logs}",
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()  # no rank started a sweep of its own
    for job, seed in (("0", 1), ("1", 2)):
        run_dir = sweep / job
        d0, d1 = (json.loads((run_dir / DIGEST.format(rank=r)).read_text()) for r in (0, 1))
        assert d0["world_size"] == d1["world_size"] == 2 and {d0["rank"], d1["rank"]} == {0, 1}
        # in every epoch the ranks trained on different samples (real data parallelism) ...
        assert list(d0["rows"]) == list(d1["rows"]) == ["0", "1"]
        for epoch in ("0", "1"):
            rows0, rows1 = set(d0["rows"][epoch]), set(d1["rows"][epoch])
            assert len(rows0) == len(rows1) == 3 * 16 and not rows0 & rows1
        # ... yet hold bit-identical parameters at the end, after the unfreeze boundary
        assert d0["end"] == d1["end"]
        groups = d0["groups"]
        assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
        assert _changed(d0, groups["head"]) and _changed(d0, groups["layer4"])  # trained
        for frozen in ("stem", "layer1", "layer2", "layer3"):
            assert not _changed(d0, groups[frozen]), frozen  # not a single bit moved
        # DDP registered every parameter: requires_grad stayed True, frozen ones got no update
        assert all(d0["requires_grad"].values())

        # rank 0 alone wrote the run's files
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["epochs"] == 2
        # the test predictions of both ranks' shards, gathered: every test image once
        ids = load_predictions(run_dir)["ids"].tolist()
        assert len(ids) == len(set(ids)) > 200  # both ranks' shares (about 135 each)
        log_text = (run_dir / "run.log").read_text()
        assert log_text.count("Run directory:") == 1, log_text  # rank 1 logged nothing into it
        assert "GLOBAL_RANK: 1" not in log_text
    assert d0["start"] != json.loads((sweep / "0" / DIGEST.format(rank=0)).read_text())["start"]
