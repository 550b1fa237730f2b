"""``task=lr_find``: the learning-rate range test, per fine-tuning strategy; and
``model.optimizer.lr=auto``, which runs it before training.

python run.py task=lr_find                                             # the configured strategy
python run.py task=lr_find 'lr_find.strategies=[linear_probe,progressive,full]'

Each strategy is tested as it starts training: its weights loaded, its frozen groups frozen
(BatchNorm of frozen groups in eval mode), every group at the swept LR times its multiplier
(mechanism: ``lightning_modules/lr_finder.py``). Writes ``lr_find.png`` (one curve per
strategy) and ``lr_find.json`` (the suggestion, minimum, steepest descent and curve of each) in
the run directory, and prints one line per strategy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import UserError

log = logging.getLogger("run")

FINETUNE_CONF = Path(__file__).resolve().parents[1] / "conf" / "finetune"
PROBE_LR = 1e-3  # the optimizer is built with this LR; the test sets every step's LR itself


def lr_find(cfg: DictConfig) -> tuple[dict, dict]:
    """Range-test each of ``lr_find.strategies`` (default: the configured ``finetune``).

    Returns ``({"lr_find/<strategy>": suggested LR, ...}, objects)``; ``objects["findings"]``
    maps each strategy to its :class:`~lightning_modules.lr_finder.LRFinding`.
    """
    from tasks.instantiate import instantiate
    from tasks.seed import seed_run

    options = cfg.get("lr_find") or {}
    strategies = list(options.get("strategies") or [cfg.finetune.name])
    out_dir = Path(cfg.paths.output_dir)
    seed = seed_run(cfg.seed)
    datamodule = instantiate(cfg.data, seed=seed, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    findings = {s: find_lr(with_strategy(cfg, s), datamodule) for s in strategies}
    _write(out_dir, findings, cfg)
    metrics = {f"lr_find/{s}": f.suggestion for s, f in findings.items()}
    for s, f in findings.items():
        print(f"lr_find {s}: suggested lr {f.suggestion:.3g} (loss minimum at {f.minimum:.3g})")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "findings": findings}


def find_lr(cfg: DictConfig, datamodule):
    """The range test of ``cfg``'s model and strategy on ``datamodule``'s training loader."""
    import torch
    import torch.nn.functional as F

    from lightning_modules.lr_finder import lr_range_test
    from tasks.instantiate import instantiate
    from tasks.seed import seed_run
    from tasks.train import build_model

    if getattr(datamodule, "tasks", None) is not None:
        raise UserError(
            "lr_find tests single-task classifiers; for multi-task data set model.optimizer.lr."
        )
    options = cfg.get("lr_find") or {}
    seed_run(cfg.seed)
    model, finetuning = build_model(_with_lr(cfg, PROBE_LR), datamodule)
    model.train()
    if finetuning.callback:  # the strategy's last stage: the LR must hold with all it unfreezes
        unfreeze = instantiate(finetuning.callback)
        plan = unfreeze.make_plan(model.net, max_epochs=cfg.trainer.get("max_epochs"))
        model.finetune_plan = plan
        unfreeze.plan = plan
        last = max((e for e in plan.unfreeze_epochs if e is not None), default=0)
        unfreeze.set_state(model.net, last, training=True)
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    device = (
        "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
    )
    model.to(device)
    from lightning_modules.optimization import build_optimizer

    optimizer = build_optimizer(model.optimizer_factory, model.param_groups())
    smoothing = float(model.hparams.label_smoothing)

    def loss_of(batch):
        x, y, *_ = batch
        return F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=smoothing)

    steps = int(options.get("steps", 100))
    warn_if_memorised(steps, datamodule)
    finding = lr_range_test(
        optimizer,
        loss_of,
        datamodule.train_dataloader(),
        min_lr=float(options.get("min_lr", 1e-6)),
        max_lr=float(options.get("max_lr", 1.0)),
        steps=steps,
    )
    log.info(
        "lr_find (%s): suggested lr %.3g (minimum of the loss at %.3g, steepest descent at %.3g)",
        finetuning.strategy,
        finding.suggestion,
        finding.minimum,
        finding.steepest,
    )
    return finding


MAX_PASSES = 3  # a range test that sees each training image more often measures memorisation


def warn_if_memorised(steps: int, datamodule) -> float:
    """One warning when the range test goes over the training set more than :data:`MAX_PASSES`
    times: its loss curve then measures memorisation, and its suggestion is noise (with ImageNet
    weights at 10 labels per class, seeds 1-3 got 2.3e-5 to 6.6e-4 and 12-37 % test accuracy,
    against 80.9 % at a fixed 0.005). Returns the number of passes."""
    n = len(datamodule.datasets["train"])
    passes = steps * min(datamodule.batch_size, n) / max(1, n)
    if passes > MAX_PASSES:
        log.warning(
            "The LR range test takes %d steps over %d training images (%.0f passes): on so "
            "little data its suggestion is not reliable. Set model.optimizer.lr yourself "
            "(docs/which-strategy-when.md: 0.005 with ImageNet weights at 10 labels per class), "
            "or lower lr_find.steps.",
            steps,
            n,
            passes,
        )
    return passes


def resolve_auto_lr(cfg: DictConfig, datamodule, out_dir: Path) -> float | None:
    """``model.optimizer.lr=auto``: run the range test (or reuse this run's ``lr_find.json``
    when it continues), set the suggestion in ``cfg`` and return it; None when the LR is given."""
    if str(OmegaConf.select(cfg, "model.optimizer.lr")) != "auto":
        return None
    saved = out_dir / "lr_find.json"
    strategy = str(cfg.finetune.name)
    if saved.is_file():  # a resumed run keeps the LR it started with
        lr = float(json.loads(saved.read_text())[strategy]["suggestion"])
        log.info("model.optimizer.lr=auto: %.3g, from %s", lr, saved)
    else:
        findings = {strategy: find_lr(cfg, datamodule)}
        _write(out_dir, findings, cfg)
        lr = findings[strategy].suggestion
        log.info("model.optimizer.lr=auto: %.3g (range test: %s)", lr, out_dir / "lr_find.png")
    with open_dict(cfg):
        cfg.model.optimizer.lr = lr
    return lr


def with_strategy(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` with ``finetune`` replaced by ``conf/finetune/<name>.yaml``."""
    path = FINETUNE_CONF / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in FINETUNE_CONF.glob("*.yaml")))
        raise UserError(f"lr_find.strategies: unknown strategy {name!r}; use some of {known}.")
    if name == cfg.finetune.get("name"):
        return cfg
    out = cfg.copy()
    with open_dict(out):
        out.finetune = _finetune_config(path)
    return out


def _finetune_config(path: Path) -> DictConfig:
    """A finetune group file with its defaults list merged in (the group's own files)."""
    raw = OmegaConf.load(path)
    parents = [d for d in raw.pop("defaults", []) if d != "_self_"]
    base = [_finetune_config(path.parent / f"{p}.yaml") for p in parents]
    return OmegaConf.merge(*base, raw)


def _with_lr(cfg: DictConfig, lr: float) -> DictConfig:
    out = cfg.copy()
    with open_dict(out):
        out.model.optimizer.lr = lr
    return out


def _write(out_dir: Path, findings: dict, cfg: DictConfig) -> None:
    from lightning_modules.lr_finder import plot_findings
    from lightning_modules.run_outputs import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "lr_find.json", {s: f.as_dict() for s, f in findings.items()})
    plot_findings(findings, out_dir / "lr_find.png", title=f"{cfg.model.backbone}: LR range test")
