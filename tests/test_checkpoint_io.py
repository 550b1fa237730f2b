"""Checkpoint files: written in one pass, whole or not at all, loadable with weights_only=True."""

import pytest
import torch

from lightning_modules.checkpoint_io import FileCheckpointIO


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((4, 4), value)}, "epoch": 1, "global_step": 10}


def test_a_checkpoint_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoints" / "best.ckpt"  # the folder does not exist yet
    FileCheckpointIO().save_checkpoint(_checkpoint(1.5), path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((4, 4), 1.5))
    assert loaded["global_step"] == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.ckpt"]
    FileCheckpointIO().save_checkpoint(_checkpoint(2.5), path)  # replaced in place
    assert torch.load(path, weights_only=True)["state_dict"]["w"][0, 0] == 2.5


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way through writing its file (here: torch.save writes some bytes,
    then fails, as a full disk would) leaves the earlier file intact and no temporary file."""
    path = tmp_path / "last.ckpt"
    io = FileCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(_checkpoint(9.0), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["state_dict"]["w"][0, 0] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_remote_paths_go_to_lightnings_writer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "lightning_fabric.plugins.TorchCheckpointIO.save_checkpoint",
        lambda self, checkpoint, path, storage_options=None: calls.append(str(path)),
    )
    FileCheckpointIO().save_checkpoint(_checkpoint(1.0), "memory://bucket/best.ckpt")
    assert calls == ["memory://bucket/best.ckpt"]
    assert not list(tmp_path.iterdir())


def test_a_training_run_writes_its_checkpoints_with_it(cfg_factory, tmp_path):
    """The run's best.ckpt/last.ckpt come from FileCheckpointIO (no CRC-32 in the zip records,
    which Lightning's writer would compute) and load with weights_only=True."""
    import zipfile

    from tasks.train import train

    cfg = cfg_factory(
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "tta=none", "logger=none"
    )
    train(cfg)
    run_dir = tmp_path
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        assert {i.CRC for i in zipfile.ZipFile(path).infolist()} == {0}
        assert "state_dict" in torch.load(path, weights_only=True)
