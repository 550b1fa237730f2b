"""A run's data contract: what any later use of its checkpoint needs to be correct.

Every training run records, in ``<run dir>/contract.json`` and in each checkpoint (key
``data_contract``):

- ``backbone``, ``class_names`` in order (or the ``tasks`` of multi-task data);
- ``input``: the input settings the network was trained with (``image_size``, ``mean``, ``std``,
  ``interpolation``, ``crop_pct``), and ``mirror_invariant``;
- ``source`` (its type and settings) and ``fingerprint`` (a digest of every sample id and label
  the source offers), ``split_seed``, and per split the count and a digest of its sample ids
  (the ids themselves are in ``<run dir>/splits.npz``);
- ``data``: the resolved ``data`` config, so that eval and visualize rebuild the same data module
  without being told the training run's data options;
- ``initial_weights``: a digest of the backbone's weights before training (the head left out):
  members that share it were fine-tuned from the same weights and can be averaged into a soup
  (:mod:`lightning_modules.soup`); runs from scratch differ in it.

Checkpoints also carry a 64-bit key per training sample id (``train_keys``), so fine-tuning from
a checkpoint can check, with nothing but the file, that its validation and test images were never
training images of the weights (:func:`check_no_leak`).

Who reads it: weights reuse (the head is kept only for the same classes in the same order),
``task=eval``, ``predict``, ``visualize`` and ensembles (input settings and classes from the
checkpoint; members with different contracts are refused). Checkpoints written before contracts
existed still load, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import UserError

log = logging.getLogger(__name__)

CONTRACT_KEY = "data_contract"  # in checkpoints
CONTRACT_FILE = "contract.json"  # in run directories
SPLITS_FILE = "splits.npz"  # in run directories: the sample ids of every split
VERSION = 1
SPLITS = ("train", "val", "test")
INPUT_KEYS = ("image_size", "mean", "std", "interpolation", "crop_pct")
# contract input key -> data config key
DATA_KEYS = {
    "image_size": "image_size",
    "mean": "mean",
    "std": "std",
    "interpolation": "interpolation",
    "crop_pct": "eval_crop_pct",
}
# data keys that say how to load, not what: always this command's
LOADER_KEYS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "cache",
    "cache_dir",
)
# what must agree between the members of an ensemble (and between a model and its data)
MEMBER_KEYS = ("class_names", "tasks", "input", "mirror_invariant")
# what must agree between a run and the checkpoint it resumes from
RESUME_KEYS = ("backbone", *MEMBER_KEYS, "split_seed", "splits")


# ---------------------------------------------------------------------------- writing
def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """A 64-bit key per sample id (what checkpoints carry of the training ids)."""
    from datamodules.split import id_keys as keyed

    return keyed(ids, seed=0, salt="id")


def build_contract(datamodule, *, backbone: str, data_config: Mapping | None = None) -> dict:
    """The contract of a run of ``backbone`` on ``datamodule`` (after its ``setup``)."""
    from datamodules.image_datamodule import source_identity

    tasks = getattr(datamodule, "tasks", None)
    return {
        "version": VERSION,
        "backbone": str(backbone),
        "class_names": None if tasks is not None else list(datamodule.class_names),
        "tasks": head_tasks(tasks),
        "input": datamodule.input_settings(),
        "mirror_invariant": bool(datamodule.mirror_invariant),
        "source": source_identity(datamodule.source),
        "fingerprint": datamodule.source_fingerprint,
        "split_seed": int(datamodule.split_seed),
        "splits": {
            s: {"count": len(datamodule.ids(s)), "sha1": ids_digest(datamodule.ids(s))}
            for s in SPLITS
            if s in datamodule.datasets
        },
        "data": portable_data_config(data_config) if data_config is not None else None,
    }


def portable_data_config(data) -> dict:
    """The ``data`` config as plain python that rebuilds the same data anywhere.

    Interpolations into other groups (``model.backbone``, ``augment``, ``paths``) are resolved;
    references inside ``data`` (``source.root: ${..root}``) are kept, so that overriding
    ``data.root`` later still reaches the source; paths (keys ending in ``root`` or ``path``)
    are made absolute, valid from any working directory.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(data):
        data = OmegaConf.create(dict(data))

    def walk(node, keys: list[str]):
        if isinstance(node, dict):
            return {k: walk(v, [*keys, str(k)]) for k, v in node.items()}
        if "${" in json.dumps(node):
            if isinstance(node, str) and _stays_inside(node, depth=len(keys)):
                return node
            value = OmegaConf.select(data, ".".join(keys))
            return (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        if isinstance(node, str) and keys and keys[-1].endswith(("root", "path")):
            return str(Path(node).expanduser().resolve())
        return node

    return walk(OmegaConf.to_container(data, resolve=False), [])


def _stays_inside(text: str, *, depth: int) -> bool:
    """Whether ``text`` is one relative interpolation (``${..root}``) that resolves inside the
    node at ``depth`` below the data config's top."""
    if not (text.startswith("${.") and text.endswith("}") and text.count("${") == 1):
        return False
    dots = len(text[2:]) - len(text[2:].lstrip("."))
    return ":" not in text and dots <= depth


def head_tasks(tasks: Mapping | None) -> dict | None:
    """What a multi-task head is made for: each task's type and class names (not label stats)."""
    if tasks is None:
        return None
    return {
        name: {"type": spec["type"], "class_names": spec.get("class_names")}
        for name, spec in tasks.items()
    }


def checkpoint_contract(contract: dict, datamodule) -> dict:
    """The contract as a checkpoint stores it: with the training ids' keys (int64 tensor)."""
    import torch

    keys = id_keys(datamodule.ids("train")).view(np.int64)
    return {**contract, "train_keys": torch.from_numpy(np.sort(keys))}


def write_run_contract(run_dir: str | Path, contract: dict, datamodule) -> None:
    """``contract.json`` and ``splits.npz`` (the sample ids of every split) in ``run_dir``."""
    from lightning_modules.run_outputs import atomic_write, write_json

    run_dir = Path(run_dir)
    write_json(run_dir / CONTRACT_FILE, contract)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, **{s: np.asarray(datamodule.ids(s), dtype=str) for s in contract["splits"]}
            )

    atomic_write(run_dir / SPLITS_FILE, write)


# ---------------------------------------------------------------------------- reading
def read_run_contract(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / CONTRACT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_splits(run_dir: str | Path) -> dict[str, list[str]]:
    with np.load(Path(run_dir) / SPLITS_FILE, allow_pickle=False) as data:
        return {k: data[k].tolist() for k in data.files}


def contract_of(checkpoint: Mapping, path: str | Path, *, warn: bool = True) -> dict | None:
    """The contract a loaded checkpoint carries; None (and one warning) for an old one."""
    contract = checkpoint.get(CONTRACT_KEY)
    if contract is None and warn:
        log.warning(
            "Checkpoint %s carries no data contract (written by an older version): its input "
            "settings and split cannot be checked; the current data config is used as given.",
            path,
        )
    return contract


def describe_difference(a: Mapping, b: Mapping, keys: Sequence[str] = MEMBER_KEYS) -> str:
    """``"input.image_size: 24 vs 28; ..."`` for the keys where two contracts differ ('' if none)."""
    out = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += [
                f"{key}.{k}: {x.get(k)!r} vs {y.get(k)!r}"
                for k in sorted(set(x) | set(y))
                if x.get(k) != y.get(k)
            ]
        elif x != y:
            out.append(f"{key}: {_short(x)} vs {_short(y)}")
    return "; ".join(out)


def check_members_agree(
    contracts: Sequence[dict | None], paths: Sequence, *, same_test_set: bool = False
) -> dict | None:
    """The members' common contract (None when no member has one).

    Members must agree on classes, input settings and mirror invariance; with
    ``same_test_set`` (``task=eval``, which tests every member on the first one's data) also on
    the data source, the split seed and the test split. A UserError names the first difference.
    Members with a contract and members without one (older checkpoints) are not mixed: the old
    ones could not be checked.
    """
    if all(c is None for c in contracts):
        return None
    if any(c is None for c in contracts):
        old = [str(p) for c, p in zip(contracts, paths, strict=True) if c is None]
        raise UserError(
            f"{', '.join(old[:3])} carry no data contract (older checkpoints) while the other "
            "members do: their classes and input settings cannot be checked against each other; "
            "evaluate them separately, or re-train the old ones."
        )
    keys = (*MEMBER_KEYS, "fingerprint", "split_seed", "test_split") if same_test_set else None
    first, first_path = contracts[0], paths[0]
    for contract, path in zip(contracts[1:], paths[1:], strict=True):
        diff = describe_difference(_comparable(first), _comparable(contract), keys or MEMBER_KEYS)
        if diff:
            raise UserError(
                f"Checkpoints {first_path} and {path} were trained with different data "
                f"contracts ({diff}): ensemble only models trained on the same classes with the "
                "same input settings" + (" and tested on the same split." if keys else ".")
            )
    return first


def _comparable(contract: dict) -> dict:
    return {**contract, "test_split": (contract.get("splits") or {}).get("test")}


# ---------------------------------------------------------------------------- using a checkpoint
def data_config_for(cfg, contract: dict | None):
    """The ``data`` config a task on a checkpoint should use: the checkpoint's own (its source,
    classes and split), with the ``data`` overrides given on this command line on top (one
    warning names each input setting that differs from the checkpoint's), how to load (batch
    sizes, workers) from ``cfg.data``, and no training augmentation. Without a contract:
    ``cfg.data`` as composed. ``data=<group>`` on the command line means other data: ``cfg.data``.
    """
    from omegaconf import OmegaConf, open_dict

    if contract is None or not contract.get("data"):
        return cfg.data
    explicit = explicit_data_keys()
    if "" in explicit:  # data=<another group>: the user chose other data altogether
        data = cfg.data
    else:
        data = OmegaConf.create(contract["data"])
        with open_dict(data):
            data.augment = None  # testing never augments (and fits no colour PCA)
            # how to load is this machine's business, what to load the checkpoint's: a loader
            # key this command's data lacks takes its default, not the recorded run's (which
            # may have decoded every image into memory: data.cache=true)
            for key in {*LOADER_KEYS, *explicit}:
                value = OmegaConf.select(cfg.data, key, default="__absent__")
                if isinstance(value, str) and value == "__absent__":
                    if key in LOADER_KEYS:
                        data.pop(key, None)
                    continue
                if OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value, resolve=True)
                OmegaConf.update(data, key, value, force_add=True)
    warn_input_overrides(contract, data, explicit)
    return data


def warn_if_split_differs(contract: dict | None, datamodule) -> None:
    """One warning when the test images are not those the checkpoint's run was tested on."""
    if contract is None or "test" not in contract.get("splits", {}):
        return
    then, ids = contract["splits"]["test"], datamodule.ids("test")
    if then["sha1"] != ids_digest(ids):
        changed = contract.get("fingerprint") != datamodule.source_fingerprint
        log.warning(
            "The test set is not the one the checkpoint's run was tested on (%d images then, %d "
            "now%s): scores are not comparable with that run's.",
            then["count"],
            len(ids),
            "; the data source changed" if changed else "",
        )


def explicit_data_keys() -> list[str]:
    """The ``data.*`` keys given on the command line ('' for ``data=<group>``).

    Read from Hydra's record of this job's overrides; a task called outside a Hydra job (no
    ``HydraConfig``) has none: the checkpoint's settings are used as recorded.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        if key == "data":
            keys.append("")
        elif key.startswith("data."):
            keys.append(key[len("data.") :])
    return keys


def _overridden(data_key: str, explicit: Sequence[str]) -> bool:
    return data_key in explicit or "" in explicit


def warn_input_overrides(contract: dict, data, explicit: Sequence[str]) -> None:
    """One warning for the explicit data values that differ from what the model was trained on."""
    keys = {**DATA_KEYS, "mirror_invariant": "mirror_invariant"}
    trained = {**contract["input"], "mirror_invariant": contract.get("mirror_invariant")}
    changed = []
    for key, data_key in keys.items():
        now = _resolved(data, data_key)
        differs = now is not None and _normal(now) != _normal(trained[key])
        if _overridden(data_key, explicit) and differs:
            changed.append(f"data.{data_key}: trained with {trained[key]!r}, now {now!r}")
    if changed:
        log.warning(
            "Overriding what the checkpoint was trained with: %s. Its scores may not carry over.",
            "; ".join(changed),
        )


def input_settings(contract: dict | None, data, *, backbone: str | None = None) -> dict:
    """Input settings for images fed to a checkpoint: the contract's; explicit ``data`` values
    given on the command line win (after one warning). Without a contract: from ``data``, with
    ``backbone`` (the checkpoint's) filling what ``data`` leaves to the backbone."""
    from datamodules.data_config import resolve_data_config

    if contract is None:
        explicit = [*DATA_KEYS.values(), "mirror_invariant"]  # everything from data
        values, mirror = {}, None
    else:
        explicit = explicit_data_keys()
        values, mirror = dict(contract["input"]), contract.get("mirror_invariant")
        warn_input_overrides(contract, data, explicit)
    for key, data_key in DATA_KEYS.items():
        if _overridden(data_key, explicit) and _resolved(data, data_key) is not None:
            values[key] = _resolved(data, data_key)
    if _overridden("mirror_invariant", explicit):
        mirror = _resolved(data, "mirror_invariant")
    dc = resolve_data_config(
        backbone=(contract or {}).get("backbone") or backbone or _resolved(data, "backbone"),
        image_size=values.get("image_size"),
        mean=values.get("mean"),
        std=values.get("std"),
        interpolation=values.get("interpolation"),
        crop_pct=values.get("crop_pct"),
    )
    return {
        "image_size": dc.image_size,
        "mean": list(dc.mean),
        "std": list(dc.std),
        "interpolation": dc.interpolation,
        "crop_pct": dc.crop_pct,
        "mirror_invariant": bool(mirror),
    }


def check_resume(path: str | Path, contract: dict, *, max_epochs: int | None = None) -> None:
    """Refuse to resume training from a checkpoint made for another backbone, classes, input
    settings or split than this run's (``ckpt_path`` of a training run), or one that has already
    trained ``max_epochs`` epochs: the new run would train nothing, and test and report the old
    run's checkpoint as its own."""
    from lightning_modules.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    saved = contract_of(checkpoint, path)
    diff = describe_difference(saved, contract, RESUME_KEYS) if saved is not None else None
    if diff:
        raise UserError(
            f"Cannot resume from '{path}': it was trained with another setting than this run "
            f"({diff}). Continue a run with its own settings (python run.py resume=<run dir>); "
            "to start from its weights on other data or another model, use model.weights=."
        )
    done = epochs_trained(checkpoint)
    if max_epochs is not None and max_epochs >= 0 and done is not None and done >= max_epochs:
        raise UserError(
            f"Cannot resume from '{path}': it has trained {done} epoch(s) and "
            f"trainer.max_epochs={max_epochs}, so there is nothing left to train. Raise "
            f"trainer.max_epochs (e.g. trainer.max_epochs={done + max(done, 1)}) to train on."
        )


def epochs_trained(checkpoint: dict) -> int | None:
    """Epochs whose training a Lightning checkpoint has finished (None when it does not say)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- weights reuse
def check_no_leak(weights_contract: dict | None, datamodule, *, allow: bool, weights) -> None:
    """Refuse fine-tuning whose validation/test images were training images of ``weights``.

    Checked when the weights were trained on the same data: the same source fingerprint (the
    same ids and labels, wherever they are stored), or the same source type and main location
    (data that has changed since). An overlap is a UserError naming the count and the fix, or
    one warning with ``allow``.
    """
    from datamodules.image_datamodule import source_identity

    if not weights_contract or "train_keys" not in weights_contract:
        return
    same_data = weights_contract.get("fingerprint") == datamodule.source_fingerprint
    here = _location(source_identity(datamodule.source))
    if not same_data and _location(weights_contract.get("source")) != here:
        return
    held = [*datamodule.ids("val"), *datamodule.ids("test")]
    trained = np.asarray(weights_contract["train_keys"].numpy(), dtype=np.int64)
    overlap = int(np.isin(id_keys(held).view(np.int64), trained).sum())
    if not overlap:
        return
    then, now = weights_contract.get("split_seed"), datamodule.split_seed
    message = (
        f"{overlap} of the {len(held)} validation/test images of this run were training images "
        f"of the run that wrote model.weights ({weights}; its data.split_seed={then}, now "
        f"{now}): their scores would be inflated."
    )
    if allow:
        log.warning("%s Going on because allow_split_overlap=true.", message)
        return
    raise UserError(
        f"{message} Use the same data.split_seed and data as that run (or separate validation/"
        "test folders), or set allow_split_overlap=true to accept the overlap knowingly."
    )


def _location(source: Mapping | None) -> dict:
    """Where a source's training pool comes from: its type, name and main file or folder
    (``root``, ``path``); not its separate val/test folders nor rendering options such as the
    digits' image_size."""
    return {k: v for k, v in (source or {}).items() if k in ("type", "name", "root", "path")}


# ---------------------------------------------------------------------------- helpers
def _resolved(data, key: str):
    from omegaconf import OmegaConf

    value = (
        OmegaConf.select(data, key, default=None)
        if OmegaConf.is_config(data)
        else (data.get(key) if isinstance(data, Mapping) else None)
    )
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _normal(value):
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
