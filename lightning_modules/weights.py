"""Load backbone weights from a local file: a timm state dict or a checkpoint of this framework.

Accepted files:
- ``.safetensors``: a timm/Hugging Face state dict (never executes code);
- ``.pth`` / ``.pt`` / ``.bin``: a torch state dict, loaded with ``torch.load(weights_only=True)``,
  or a dict ``{"state_dict": ..., "pretrained_cfg": {...}, "class_names": [...]}`` that also
  records the inputs the weights expect and the classes of their head;
- ``.ckpt``: a Lightning checkpoint of this framework (its ``state_dict`` with the ``net.``
  prefix), also with ``weights_only=True`` - transfer from your own earlier run.

The head is kept only when the file says it was trained for exactly this run's classes, in the
same order (a checkpoint of this framework records its class names, or its tasks); a head trained
on other classes - or on classes the file does not name, as in a plain state dict - is
re-initialised, and one log line names both class lists. timm hub weights follow the same rule
against the ImageNet classes (:func:`renew_hub_head`). Every other backbone weight must load, or
the load fails with the mismatching names (a file of another architecture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from datamodules.errors import UserError
from lightning_modules.layer_groups import layer_groups

log = logging.getLogger(__name__)

PREFIXES = ("net.", "model.", "module.")


@dataclass
class LoadReport:
    """What a weights file gave the model."""

    path: str
    contract: dict | None = None  # the data contract of a checkpoint of this framework
    loaded: list[str] = field(default_factory=list)
    head_reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"Loaded {len(self.loaded)} tensors from {self.path}"
        if self.head_reinitialised:
            text += f"; new head: {', '.join(self.head_reinitialised)}"
        if self.missing:
            text += f"; missing, kept at init: {', '.join(self.missing[:8])}"
        if self.unexpected:
            text += f"; unused from file: {', '.join(self.unexpected[:8])}"
        return text


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a weights file and what the file says about them: ``{"head": the classes (or
    tasks) its head was trained for, None when unknown; "contract": its data contract}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Weights file '{path}' does not exist: set model.weights to a .safetensors, .pth "
            "or .ckpt file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unsafe pickle, a corrupt or foreign file
            raise UserError(
                f"Could not read weights from '{path}' as tensors only ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). Use a .safetensors file or a plain "
                "state dict saved with torch.save(model.state_dict(), path)."
            ) from err
    about = _about(state)
    for key in ("state_dict", "model", "model_state_dict"):  # checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' holds no state dict of tensors: cannot load it as weights.")
    for prefix in PREFIXES:  # a LightningModule's backbone (metrics' states are left out)
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner and len(inner) * 2 >= len(state):
            state = inner
            break
    return state, about


def _about(raw) -> dict:
    """The head's classes and the data contract of a checkpoint of this framework."""
    from lightning_modules.data_contract import CONTRACT_KEY, head_tasks

    if isinstance(raw, dict) and isinstance(
        raw.get("class_names"), list
    ):  # a state dict + its classes
        return {"head": [str(c) for c in raw["class_names"]], "contract": None}
    if not isinstance(raw, dict) or not isinstance(raw.get("hyper_parameters"), dict):
        return {"head": None, "contract": None}
    hparams = raw["hyper_parameters"]
    head = head_tasks(hparams["tasks"]) if hparams.get("tasks") else hparams.get("class_names")
    return {"head": head, "contract": raw.get(CONTRACT_KEY)}


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    class_names: list[str] | None = None,
    tasks: dict | None = None,
) -> LoadReport:
    """Load ``path`` into the timm ``model``; its head only when trained for the same classes.

    Args:
        model: the timm network (its head is :meth:`get_classifier`).
        path: the weights file.
        class_names: this run's classes, in order; or ``tasks``, a multi-task run's tasks.
    """
    from lightning_modules.data_contract import head_tasks

    state, about = read_weights(path)
    own = model.state_dict()
    head = set(layer_groups(model)[-1].param_names)
    head_modules = {n.rsplit(".", 1)[0] for n in head}
    wanted = head_tasks(tasks) if tasks is not None else (list(class_names or []) or None)
    keep_head = about["head"] is not None and about["head"] == wanted
    report = LoadReport(path=str(path), contract=about["contract"])
    usable = {}
    wrong = []
    for key, tensor in state.items():
        is_head = key.rsplit(".", 1)[0] in head_modules
        if key not in own:
            report.unexpected.append(key)
        elif is_head and (not keep_head or own[key].shape != tensor.shape):
            report.head_reinitialised.append(key)
        elif own[key].shape != tensor.shape:
            wrong.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = tensor
    if report.head_reinitialised:
        log.info(
            "New head: the weights' head was trained for %s, this run has %s: it is "
            "re-initialised (a head is kept only for the same classes in the same order).",
            _classes(about["head"]),
            _classes(wanted),
        )
    backbone_keys = [k for k in own if k.rsplit(".", 1)[0] not in head_modules]
    missing_backbone = [k for k in backbone_keys if k not in usable]
    if wrong or (backbone_keys and len(missing_backbone) > len(backbone_keys) // 2):
        detail = "; ".join(wrong[:3]) or f"{len(missing_backbone)} of {len(backbone_keys)} missing"
        raise UserError(
            f"Weights in '{path}' do not fit backbone '{type(model).__name__}' ({detail}): "
            "they were saved from another architecture. Set model.backbone to the one they "
            "were trained with."
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(
        k for k in own if k not in usable and k not in report.head_reinitialised
    )
    log.info("%s", report.summary())
    return report


def _classes(head) -> str:
    if head is None:
        return "unknown classes"
    if isinstance(head, dict):
        return f"tasks {list(head)}"
    names = [str(c) for c in head]
    return f"classes {names[:20]}" + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")


def renew_hub_head(model: nn.Module, class_names: list[str] | None) -> bool:
    """timm hub weights: keep the pretrained head only for its own classes, in order.

    timm keeps the hub head when the run has as many classes as the pretrained model (1000 for
    ImageNet). Unless the run's class names are those classes (ImageNet synsets, as
    ``timm.data.ImageNetInfo`` names them), the head is re-initialised. Returns whether it was.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n = getattr(model, "num_classes", None)
    if not n or n != cfg.get("num_classes"):
        return False  # timm already gave it a fresh head
    labels = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        labels = ImageNetInfo(subset).label_names() if subset else None
    except Exception:  # not an ImageNet model, or no label information
        labels = None
    if labels is not None and list(class_names or []) == list(labels):
        return False
    model.reset_classifier(n)
    log.info(
        "New head: the hub weights' head was trained for %s, this run has %s: it is "
        "re-initialised.",
        _classes(labels),
        _classes(class_names),
    )
    return True
