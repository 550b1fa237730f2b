"""The soups of a seed ensemble: its members averaged in weight space (one model at one's cost).

For the members of one setting (:mod:`tasks.ensemble`):

1. they are soupable only when every member's data contract records the same
   ``initial_weights`` digest (fine-tuned from identical pretrained weights). Members trained
   from scratch start from different random weights: averaging those gives a broken model, so
   they are reported as "not soupable" and nothing is loaded;
2. the **uniform soup** averages every member's weights; the **greedy soup** (Wortsman et al.
   2022) takes the members by validation accuracy, best first, and keeps each only when the
   soup's validation accuracy does not drop (:func:`lightning_modules.soup.greedy_soup`);
3. BatchNorm layers whose weights or statistics differ between the members get their running
   statistics re-estimated on training images (the members' do not fit averaged weights) before
   every validation score, a member alone included (like is compared with like); layers the
   members share (frozen ones) keep theirs;
4. each soup is written as a checkpoint (``soups/<kind>.ckpt``: the first member's
   hyper-parameters and data contract, the soup's weights) that ``task=eval``, ``predict`` and
   ``visualize`` accept, with its temperature fitted on validation next to it, and its
   validation and test predictions (``soups/predictions/<kind>_<split>.npz``), with TTA when
   the members were tested with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("uniform", "greedy")
SOUP_DIR = "soups"
MAX_BN_IMAGES = 2048  # training images for the BatchNorm statistics of a soup (one pass)


def soupable(contracts: list[dict | None]) -> tuple[bool, str]:
    """Whether members with these data contracts can be averaged, and why (not)."""
    digests = [(c or {}).get("initial_weights") for c in contracts]
    if any(d is None for d in digests):
        return False, "not soupable: a member's run did not record its initial weights"
    if len(set(digests)) > 1:
        return False, "not soupable: different initial weights (trained from scratch?)"
    return True, "same initial weights"


def build_soups(
    members: list[Any],
    checkpoints: list[Path],
    out_dir: Path,
    *,
    contract: dict,
    tta_config: dict | None,
    val_accuracy: list[float],
    ids: dict[str, list[str]],
) -> dict[str, Any]:
    """Uniform and greedy soups of ``checkpoints`` (one per member, in member order), evaluated
    and written under ``out_dir/soups``.

    Returns ``{kind: {"checkpoint", "members", "predictions": {split: npz arrays},
    "bn_reestimated", "val_acc", "temperature"}}``; ``val_accuracy`` is each member's own
    validation accuracy (its saved predictions), which orders the greedy soup. ``ids``: per
    split (``val``, ``test``) the sample ids the members predicted, in their order: the soups
    predict exactly those (a run with ``limit_test_batches`` tested only some).
    """
    from lightning_modules.checkpoints import read_checkpoint
    from lightning_modules.soup import average_state_dicts, greedy_soup

    raw = [read_checkpoint(p) for p in checkpoints]
    names = [f"seed {m.seed}" for m in members]
    states = dict(zip(names, (_net_state(c) for c in raw), strict=True))
    own_acc = dict(zip(names, val_accuracy, strict=True))
    pot = _Pot(checkpoints[0], contract, tta_config, states=states, own_acc=own_acc, ids=ids)
    greedy = greedy_soup(list(states.items()), pot.val_acc)
    soups = {
        "uniform": (average_state_dicts(list(states.values())), names),
        "greedy": (greedy.state_dict, greedy.kept),
    }
    alone = {name: float(score) for name, score in greedy.individual.items()}
    results = {}
    for kind, (state, kept) in soups.items():
        results[kind] = pot.serve(kind, state, out_dir / SOUP_DIR)
        path = _save_soup(
            out_dir / SOUP_DIR / f"{kind}.ckpt",
            raw[0],
            pot.model,
            kind=kind,
            members=kept,
            names=names,
        )
        results[kind].update(checkpoint=str(path), members=kept)
        if kind == "greedy":  # each member's validation accuracy as the greedy choice saw it
            results[kind]["member_val_acc"] = alone
        results[kind].update(_calibrate(out_dir / SOUP_DIR, kind, path, pot.tta))
        log.info("%s soup of %s: %s", kind.capitalize(), ", ".join(kept), path)
    return results


class _Pot:
    """One network to load soups into, the members' data (validation, test, and training
    images for BatchNorm statistics) and their TTA."""

    def __init__(
        self,
        checkpoint: Path,
        contract: dict,
        tta_config,
        *,
        states: dict[str, dict],
        own_acc: dict[str, float],
        ids: dict[str, list[str]],
    ) -> None:
        import torch

        from lightning_modules.ensemble import load_classifier
        from lightning_modules.soup import differing_batchnorm

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_classifier(checkpoint).to(self.device)
        self.datamodule = _datamodule(contract)
        self.tta = _tta(tta_config, self.datamodule)
        self.own_acc = own_acc
        self.members = {id(state): name for name, state in states.items()}  # a member alone
        # per split, the rows the members predicted (None: all)
        self.rows = {split: _rows(self.datamodule, split, wanted) for split, wanted in ids.items()}
        # the BatchNorm layers that differ between the members, and images to re-estimate them
        self.bn_layers = differing_batchnorm(self.model.net, list(states.values()))
        self.bn_batches = _bn_batches(self.datamodule) if self.bn_layers else []

    def load(self, state) -> int:
        """Load ``state``; re-estimate its BatchNorm statistics (the number of layers)."""
        from lightning_modules.soup import reestimate_batchnorm

        self.model.net.load_state_dict(state)
        if not self.bn_batches or not self.bn_layers:
            return 0
        return reestimate_batchnorm(
            self.model.net, self.bn_batches, device=self.device, only=self.bn_layers
        )

    def val_acc(self, state) -> float:
        """The greedy soup's score: validation accuracy (a member alone: its saved one)."""
        from lightning_modules.metrics import accuracy
        from lightning_modules.predictions import predict_split

        name = self.members.get(id(state))
        if name is not None and not self.bn_layers:  # a member alone, as it was scored
            return self.own_acc[name]
        # else a member alone gets re-estimated statistics too: like is compared with like
        self.load(state)
        out = predict_split(self.model, self.datamodule, "val", rows=self.rows.get("val"))
        return accuracy(out["probs"].numpy(), out["targets"].numpy())

    def serve(self, kind: str, state, out_dir: Path) -> dict[str, Any]:
        """Load the soup, predict validation and test (and with TTA), save the predictions."""
        import numpy as np

        from lightning_modules.metrics import accuracy
        from lightning_modules.predictions import predict_split
        from lightning_modules.run_outputs import save_test_outputs

        n_bn = self.load(state)
        dm, predictions = self.datamodule, {}
        for split in ("val", "test"):
            for views in (None, self.tta) if self.tta is not None else (None,):
                key = split if views is None else f"{split}_tta"
                outputs = predict_split(self.model, dm, split, tta=views, rows=self.rows.get(split))
                save_test_outputs(
                    out_dir, f"{kind}_{key}", outputs, ids=dm.ids(split), class_names=dm.class_names
                )
                predictions[key] = {
                    "probs": outputs["probs"].numpy().astype(np.float32),
                    "targets": outputs["targets"].numpy(),
                    "ids": np.asarray([dm.ids(split)[r] for r in outputs["rows"].tolist()]),
                }
        val = predictions["val"]
        return {
            "bn_reestimated": n_bn,
            "val_acc": accuracy(val["probs"], val["targets"]),
            "predictions": predictions,
        }


def _calibrate(out_dir: Path, kind: str, checkpoint: Path, tta) -> dict[str, Any]:
    """The soup's temperatures, fitted on its validation predictions, next to its checkpoint
    (``<kind>.calibration.json``: ``calibrate=true`` works on soups as on any run)."""
    from lightning_modules.calibration import calibrate_run, tta_setting

    metrics = calibrate_run(
        out_dir,
        checkpoint=checkpoint,
        prefix=f"{kind}_",
        tta=tta_setting(tta),
    )
    return {"temperature": metrics.get("calibration/temperature")}


def _rows(datamodule, split: str, wanted: list[str]) -> list[int] | None:
    """The rows of ``split`` holding the ids ``wanted`` (None: all of them, in order); the
    members' images must all be there (the same data as when they were tested)."""
    ids = datamodule.ids(split)
    if list(wanted) == list(ids):
        return None
    where = {sample: row for row, sample in enumerate(ids)}
    missing = [w for w in wanted if w not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} {split} images of the members are not in their data any more "
            f"(e.g. {missing[0]}): the soups cannot be scored on the members' images"
        )
    return sorted(where[w] for w in wanted)


def _net_state(checkpoint: dict) -> dict:
    """The network's tensors of a Lightning checkpoint (``net.`` prefix removed)."""
    prefix = "net."
    return {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }


def _datamodule(contract: dict):
    """The members' data (their contract's ``data``), without training augmentation."""
    from omegaconf import OmegaConf, open_dict

    from tasks.instantiate import instantiate

    data = OmegaConf.create(contract["data"])
    with open_dict(data):
        data.augment = None
    datamodule = instantiate(data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def _tta(tta_config: dict | None, datamodule):
    if not tta_config or tta_config.get("mode") in (None, "none"):
        return None
    from lightning_modules.tta import TestTimeAugmentation

    settings = {k: v for k, v in tta_config.items() if k not in ("_target_", "prefix")}
    settings["interpolation"] = datamodule.interpolation
    settings["mirror_invariant"] = datamodule.mirror_invariant
    tta = TestTimeAugmentation(**settings)
    return tta if tta.enabled else None


def _bn_batches(datamodule) -> list:
    """Up to :data:`MAX_BN_IMAGES` training images drawn at random (seeded; training rows are in
    class order, so the first ones would be a few classes), in eval-size batches, kept in
    memory: the same images for every soup. The data has no augmentation (:func:`_datamodule`)."""
    import numpy as np

    n = len(datamodule.datasets["train"])
    rows = np.sort(np.random.default_rng(0).permutation(n)[:MAX_BN_IMAGES]).tolist()
    return [x for x, _, _ in datamodule.eval_dataloader("train", rows=rows)]


def _save_soup(
    path: Path, template: dict, model, *, kind: str, members: list[str], names: list[str]
) -> Path:
    import torch

    from lightning_modules.run_outputs import atomic_write

    checkpoint = {
        key: template[key]
        for key in ("hyper_parameters", "data_contract", "pytorch-lightning_version")
        if key in template
    }
    checkpoint["state_dict"] = {
        f"net.{k}": v.detach().cpu() for k, v in model.net.state_dict().items()
    }
    checkpoint["soup"] = {"kind": kind, "members": list(members), "of": list(names)}
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return path
