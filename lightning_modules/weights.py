"""Load backbone weights from a local file: a timm state dict or a checkpoint of this framework.

Accepted files:
- ``.safetensors``: a timm/Hugging Face state dict (never executes code);
- ``.pth`` / ``.pt`` / ``.bin``: a torch state dict, loaded with ``torch.load(weights_only=True)``;
- ``.ckpt``: a Lightning checkpoint of this framework (its ``state_dict`` with the ``net.``
  prefix), also with ``weights_only=True`` - transfer from your own earlier run.

Head weights whose shape does not match the new number of classes are dropped (the new head keeps
its fresh initialisation); every other backbone weight must load, or the load fails with the
mismatching names (a file of another architecture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lightning_modules.errors import UserError
from lightning_modules.layer_groups import layer_groups

log = logging.getLogger(__name__)

PREFIXES = ("net.", "model.", "module.")


@dataclass
class LoadReport:
    """What a weights file gave the model."""

    path: str
    loaded: list[str] = field(default_factory=list)
    head_reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"Loaded {len(self.loaded)} tensors from {self.path}"
        if self.head_reinitialised:
            text += f"; new head (shape differs): {', '.join(self.head_reinitialised)}"
        if self.missing:
            text += f"; missing, kept at init: {', '.join(self.missing[:8])}"
        if self.unexpected:
            text += f"; unused from file: {', '.join(self.unexpected[:8])}"
        return text


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (no code is ever executed while reading it)."""
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
    return state


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load ``path`` into the timm ``model``; re-initialise the head when its shape differs."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = set(layer_groups(model)[-1].param_names)
    head_modules = {n.rsplit(".", 1)[0] for n in head}
    report = LoadReport(path=str(path))
    usable = {}
    wrong = []
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != tensor.shape:
            if key.rsplit(".", 1)[0] in head_modules:
                report.head_reinitialised.append(key)
            else:
                wrong.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = tensor
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
