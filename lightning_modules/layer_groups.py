"""Layer groups of any timm model, stem → head, from timm's own grouping.

``timm`` models describe their structure with ``group_matcher(coarse=True)`` (stem, then one
group per stage or block); :func:`timm.models.group_parameters` turns it into ordered groups of
parameter names. Here the classifier is split out as its own last group (exactly the parameters of
``get_classifier()``), and whatever else shared its group (a final norm, a ``conv_head``) joins the
top backbone group, so a frozen backbone stays frozen up to the classifier. Models without a
matcher fall back to one group per top-level child module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class LayerGroup:
    """A named, ordered set of parameters that is frozen, unfrozen and scheduled together."""

    name: str
    param_names: list[str] = field(default_factory=list)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[n] for n in self.param_names]

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose own parameters all belong to this group (for BatchNorm eval mode)."""
        names = set(self.param_names)
        out = []
        for mod_name, module in model.named_modules():
            own = [
                f"{mod_name}.{p}" if mod_name else p
                for p, _ in module.named_parameters(recurse=False)
            ]
            if own and all(p in names for p in own):
                out.append(module)
        return out


def _group_name(first_param: str) -> str:
    parts = first_param.split(".")
    if len(parts) > 2 and parts[1].isdigit() and not any(c.isdigit() for c in parts[0]):
        return f"{parts[0]}.{parts[1]}"  # blocks.3, stages.2
    return parts[0]  # layer1, s1, conv_head


def _classifier_names(model: nn.Module) -> list[str]:
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, nn.Module):
        return []
    ids = {id(p) for p in classifier.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _matcher_groups(model: nn.Module) -> list[list[str]] | None:
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        return None
    from timm.models import group_parameters

    grouped = group_parameters(model, matcher(coarse=True))
    return [list(grouped[k]) for k in sorted(grouped)]


def _children_groups(model: nn.Module) -> list[list[str]]:
    groups = []
    for child_name, child in model.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    return ([direct] if direct else []) + groups


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Ordered groups from the stem to the head; every parameter in exactly one group.

    The last group is named ``head`` and holds exactly the classifier's parameters (when the model
    has a ``get_classifier()``); the first is named ``stem``.
    """
    raw = _matcher_groups(model) or _children_groups(model)
    head = _classifier_names(model)
    head_set = set(head)
    groups: list[list[str]] = []
    for names in raw:
        rest = [n for n in names if n not in head_set]
        if rest and len(rest) < len(names) and groups:
            groups[-1] += rest  # shared the classifier's group: part of the top backbone group
        elif rest:
            groups.append(rest)
    out = [LayerGroup(name=_group_name(names[0]), param_names=names) for names in groups]
    if out:
        out[0].name = "stem"
    if head:
        out.append(LayerGroup(name="head", param_names=head))
    seen = [n for g in out for n in g.param_names]
    all_names = [n for n, _ in model.named_parameters()]
    if sorted(seen) != sorted(all_names):  # pragma: no cover - a guard for exotic models
        missing = sorted(set(all_names) - set(seen))
        raise RuntimeError(f"layer grouping lost parameters: {missing[:5]}")
    return out
