"""Model soups (Wortsman et al. 2022): average the weights of fine-tuned models into one model.

Fine-tuning the same pretrained model several times (other seeds, learning rates, augmentations)
lands the runs in one basin of the loss; the average of their weights is often better than each
of them and costs one model at inference (an ensemble costs all of them). Pure, model-agnostic
functions on state dicts and modules:

- ``average_state_dicts``: the uniform soup, the mean of all ingredients.
- ``greedy_soup``: the greedy soup: ingredients sorted by their own validation accuracy, each
  added only if the soup does not get worse on the validation set.
- ``reestimate_batchnorm``: an average of weights does not come with BatchNorm statistics that
  fit it; recompute them on some training batches (like ``torch.optim.swa_utils.update_bn``).
- ``has_batchnorm``: whether there is anything to re-estimate.
- ``state_digest``: a sha256 of a state dict, to tell whether two models hold the same weights.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GreedySoup",
    "average_state_dicts",
    "greedy_soup",
    "has_batchnorm",
    "reestimate_batchnorm",
    "state_digest",
]


# ---------------------------------------------------------------------------- uniform soup
def _check_compatible(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    """ValueError naming the first key (in the first dict's order) that differs, or its shape."""
    first = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=1):
        for key, tensor in first.items():
            if key not in other:
                raise ValueError(f"state dict {index} has no key '{key}' (state dict 0 has it)")
            if not isinstance(tensor, Tensor) or not isinstance(other[key], Tensor):
                raise TypeError(f"'{key}' is not a tensor in state dict 0 or {index}")
            if tuple(other[key].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"'{key}' has shape {tuple(other[key].shape)} in state dict {index} "
                    f"but {tuple(tensor.shape)} in state dict 0"
                )
        extra = [key for key in other if key not in first]
        if extra:
            raise ValueError(f"state dict {index} has key '{extra[0]}' that state dict 0 lacks")


def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform soup: the elementwise mean of the state dicts, in the first one's key order.

    Floating (and complex) tensors are averaged in float64 (complex128) and cast back to the
    first dict's dtype; integer and bool tensors (BatchNorm's ``num_batches_tracked``) are copied
    from the first. The result is on the first dict's devices and shares no memory with the
    inputs. All dicts must have the same keys with the same shapes, otherwise ValueError naming
    the first key that differs.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts needs at least one state dict")
    _check_compatible(state_dicts)
    soup: dict[str, Tensor] = {}
    for key, first in state_dicts[0].items():
        first = first.detach()
        if not (first.is_floating_point() or first.is_complex()):
            soup[key] = first.clone()
            continue
        wide = torch.complex128 if first.is_complex() else torch.float64
        total = torch.zeros(first.shape, dtype=wide, device=first.device)
        for state_dict in state_dicts:
            total += state_dict[key].detach().to(device=first.device, dtype=wide)
        soup[key] = (total / len(state_dicts)).to(first.dtype)
    return soup


# ---------------------------------------------------------------------------- greedy soup
@dataclass
class GreedySoup:
    """What :func:`greedy_soup` made, and how.

    ``state_dict``: the final soup (the uniform average of the ``kept`` ingredients).
    ``kept``: the names of the ingredients in the soup, in the order they were added.
    ``order``: all names in the order they were tried (by their own score, best first).
    ``scores``: per step, the score of the soup tried at that step, by the name of the
    ingredient tried: the first is the best ingredient alone; a later one is the score of the
    kept ingredients plus that one (whether or not it was kept).
    ``individual``: each ingredient's score alone.
    """

    state_dict: dict[str, Tensor]
    kept: list[str]
    scores: dict[str, float]
    order: list[str]
    individual: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The score of the final soup (that of the step that added the last kept ingredient)."""
        return self.scores[self.kept[-1]]


def _checked_score(score: Callable[[dict[str, Tensor]], float], state_dict, what: str) -> float:
    value = float(score(state_dict))
    if math.isnan(value):
        raise ValueError(f"the score of {what} is NaN")
    return value


def greedy_soup(
    candidates: Sequence[tuple[str, Mapping[str, Tensor]]],
    score: Callable[[dict[str, Tensor]], float],
) -> GreedySoup:
    """The greedy soup of Wortsman et al. (2022), recipe 'greedy'.

    ``candidates``: ``(name, state_dict)`` pairs with unique names. ``score``: the held-out
    *validation accuracy* (higher is better) of a model with the given state dict; never the
    test set, or the soup is fitted to it.

    The ingredients are sorted by their own score, best first (stable: ties keep the given
    order). The soup starts as the best one; each next ingredient is tried by scoring the
    uniform average of the kept ones plus it, and is kept only if that score is ``>=`` the
    soup's score so far. ``score`` is called once per candidate alone (with that candidate's
    state dict itself, in the given order) and once per tried addition (with a new averaged
    dict): ``2 * len(candidates) - 1`` calls in all.
    """
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    names = [name for name, _ in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    ingredients = dict(candidates)
    # alone: the candidate's own mapping, not a copy (a caller may recognise it and reuse a score)
    individual = {name: _checked_score(score, sd, f"'{name}'") for name, sd in candidates}
    order = sorted(names, key=lambda name: -individual[name])  # sorted() is stable

    best = order[0]
    kept = [best]
    scores = {best: individual[best]}
    soup = average_state_dicts([ingredients[best]])
    for name in order[1:]:
        tried = average_state_dicts([ingredients[k] for k in kept] + [ingredients[name]])
        scores[name] = _checked_score(score, tried, f"the soup with '{name}'")
        if scores[name] >= scores[kept[-1]]:
            kept.append(name)
            soup = tried
    return GreedySoup(state_dict=soup, kept=kept, scores=scores, order=order, individual=individual)


# ---------------------------------------------------------------------------- BatchNorm
def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` contains a BatchNorm layer (any ``_BatchNorm``: 1d, 2d, 3d, Sync)."""
    return any(isinstance(m, _BatchNorm) for m in module.modules())


class _Moments:
    """Per-channel count, mean and sum of squared deviations of a layer's inputs, in float64,
    merged batch by batch (Chan et al.'s parallel update: no cancellation of sum-of-squares)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:  # a forward pre-hook
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]  # (N, C, *): all but the channels
        n = x.numel() // x.shape[1]
        mean = x.mean(dim=dims)
        m2 = ((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dim=dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def write_to(self, bn: _BatchNorm) -> None:
        if self.mean is None:  # the layer saw no input: it keeps its reset statistics
            return
        bn.running_mean.copy_(self.mean.to(bn.running_mean))
        bn.running_var.copy_((self.m2 / max(self.count - 1, 1)).to(bn.running_var))


def _first_tensor(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


# long: its docstring is half of it; the reset, hooks and restoration are one try/finally
def reestimate_batchnorm(
    module: nn.Module,
    batches: Iterable[Tensor],
    *,
    device: torch.device | str | int | None = None,
    only: Iterable[str] | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer of ``module`` on ``batches``.

    ``only``: the qualified names of the layers to re-estimate (e.g. those whose weights differ
    between a soup's members); the others keep their statistics and normalise with them, in eval
    mode, during the passes, as they will at inference.

    As ``torch.optim.swa_utils.update_bn`` does: the statistics are reset, ``momentum`` is set to
    None, the whole module runs in train mode (dropout included, as there) over every batch under
    ``torch.no_grad()``, and then the momenta and training flags are restored (each submodule's
    own flag, where update_bn sets them all to the top module's). A batch is a tensor, or a
    list/tuple whose first element is the input; ``device``: where to move it first.

    One difference: update_bn's cumulative average weighs every *batch* equally and averages the
    per-batch variances; here each layer's ``running_mean``/``running_var`` are the exact mean and
    unbiased variance of all its inputs concatenated (equal to update_bn's mean when the batches
    are of one size). The inputs of a deeper layer depend, as in update_bn, on the earlier layers
    normalising with their batch statistics. ``num_batches_tracked`` counts the batches.

    Returns the number of BatchNorm layers updated: those that track running statistics
    (``track_running_stats=False`` ones have none). For 0 nothing is done and no batch is run.
    Parameters are not changed. An empty ``batches`` is a ValueError, raised before anything
    is reset; if a forward pass fails, momenta and flags are restored, the statistics not.
    """
    wanted = None if only is None else set(only)
    layers = [
        m
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm)
        and m.running_mean is not None
        and (wanted is None or name in wanted)
    ]
    kept = [m for m in module.modules() if isinstance(m, _BatchNorm) and m not in layers]
    if not layers:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("reestimate_batchnorm got no batches: the statistics would be reset")

    flags = {m: m.training for m in module.modules()}
    momenta = {bn: bn.momentum for bn in layers}
    moments = {bn: _Moments() for bn in layers}
    hooks = [bn.register_forward_pre_hook(moments[bn]) for bn in layers]
    try:
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
        module.train()
        for bn in kept:  # not re-estimated: they normalise as at inference
            bn.eval()
        with torch.no_grad():
            for batch in itertools.chain([first], iterator):
                x = _first_tensor(batch)
                module(x if device is None else x.to(device))
            for bn in layers:
                moments[bn].write_to(bn)
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in flags.items():
            m.training = training
    return len(layers)


# ---------------------------------------------------------------------------- digest
def state_digest(
    state: Mapping[str, Tensor] | nn.Module,
    *,
    exclude: Callable[[str], bool] | None = None,
) -> str:
    """A sha256 hex digest of a state dict (or a module's ``state_dict()``, buffers included).

    It hashes, in sorted-name order, each tensor's name, dtype, shape and bytes (copied to the
    CPU, contiguous), each field length-prefixed: the same for the same tensors in any dict
    order, in any process or on any device. ``exclude(name) -> True`` leaves a tensor out (e.g.
    ``lambda name: name.startswith("fc.")`` for a classifier head).
    """
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for name in sorted(state_dict):
        if exclude is not None and exclude(name):
            continue
        tensor = state_dict[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f"'{name}' is not a tensor but {type(tensor).__name__}")
        tensor = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
        put(name.encode())
        put(str(tensor.dtype).encode())
        put(repr(tuple(tensor.shape)).encode())
        put(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_digest(net: nn.Module) -> str:
    """:func:`state_digest` of a timm network without its classifier (``net.default_cfg``'s
    ``classifier`` names it: ``fc``, ``head.fc``, ...): the initial weights that decide whether
    fine-tuned members can be souped (a new head is random in every run)."""
    cfg = getattr(net, "pretrained_cfg", None) or getattr(net, "default_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def is_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    return state_digest(net, exclude=is_head)


def differing_batchnorm(module: nn.Module, states: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """The qualified names of ``module``'s BatchNorm layers whose parameters or statistics are
    not identical in every state dict of ``states`` (the layers a soup must re-estimate: a
    frozen layer keeps the statistics its members share)."""
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, _BatchNorm) or m.running_mean is None:
            continue
        prefix = f"{name}." if name else ""
        keys = [k for k in states[0] if k.startswith(prefix) and "." not in k[len(prefix) :]]
        keys = [k for k in keys if not k.endswith("num_batches_tracked")]
        if any(not torch.equal(states[0][k], s[k]) for s in states[1:] for k in keys):
            out.append(name)
    return out
