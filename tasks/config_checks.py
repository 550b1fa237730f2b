"""Start-up validation of the composed config: wrong types and impossible values fail at once.

Hydra already refuses unknown keys (``Could not override 'x'``). What YAML cannot express - a
batch size that is a word, a negative learning rate, a milestone after the last epoch - is checked
here, before any data is loaded or any model is built, with one message naming the key, the value
and a fix.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from datamodules.errors import UserError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key, test, what is expected, an example of a good value
RULES: list[tuple[str, Callable[[object], bool], str, str]] = [
    ("seed", lambda v: v is None or _is_int(v), "a whole number (or null for a random one)", "0"),
    (
        "model.optimizer.lr",
        lambda v: (_is_num(v) and v > 0) or v == "auto",
        "a positive number, or auto (the LR range test picks it)",
        "0.001",
    ),
    ("model.optimizer.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0", "0.05"),
    ("model.drop_rate", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)", "0.1"),
    ("model.label_smoothing", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)", "0.1"),
    ("model.backbone", lambda v: isinstance(v, str) and v != "", "a timm model name", "resnet18"),
    ("data.batch_size", lambda v: _is_int(v) and v >= 1, "a whole number >= 1", "64"),
    (
        "data.eval_batch_size",
        lambda v: v is None or (_is_int(v) and v >= 1),
        "a whole number >= 1",
        "256",
    ),
    ("data.num_workers", lambda v: _is_int(v) and v >= 0, "a whole number >= 0", "2"),
    ("data.split_seed", lambda v: _is_int(v), "a whole number", "0"),
    ("data.val_fraction", lambda v: _is_num(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.15"),
    ("data.test_fraction", lambda v: _is_num(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.15"),
    (
        "data.image_size",
        lambda v: v is None or (_is_int(v) and v >= 8),
        "null (the backbone's) or a whole number of pixels >= 8",
        "224",
    ),
    (
        "data.max_per_class",
        lambda v: v is None or (_is_int(v) and v >= 1),
        "null or a whole number >= 1",
        "10",
    ),
    (
        "trainer.max_epochs",
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "a whole number >= 1",
        "10",
    ),
]


def check_config(cfg: DictConfig) -> None:
    """Raise one :class:`UserError` listing every wrong value (key, value, expectation, fix)."""
    problems = []
    for key, ok, expected, example in RULES:
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__":
            continue
        if not ok(value):
            problems.append(f"{key}={value!r}: expected {expected}, e.g. {key}={example}")
    milestones = OmegaConf.select(cfg, "finetune.callback.milestones")
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if milestones and _is_int(max_epochs) and max_epochs > 0:
        late = [m for m in milestones if _is_num(m) and m >= max_epochs]
        if late:
            problems.append(
                f"finetune.callback.milestones={list(milestones)}: {late} at or after "
                f"trainer.max_epochs={max_epochs}; lower them or raise trainer.max_epochs"
            )
    metric = OmegaConf.select(cfg, "optimized_metric")
    if isinstance(metric, str) and metric.startswith("test/"):
        problems.append(
            f"optimized_metric={metric}: a search that selects on the test set reports "
            "optimistic test numbers; select on a validation metric, e.g. "
            "optimized_metric=val/acc_best or optimized_metric=val/loss"
        )
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
