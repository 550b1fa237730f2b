"""Hydra's ``instantiate`` for every task, with a user's mistake surfacing as one clear line."""

from __future__ import annotations

from omegaconf import DictConfig

from datamodules.errors import UserError


def instantiate(conf, **kwargs):
    """``hydra.utils.instantiate``, re-raising a user mistake as the :class:`UserError` it is."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(conf, **kwargs)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from err


def instantiate_all(group: DictConfig | None, **kwargs) -> list:
    """Instantiate every entry of a dict of named configs (``None`` entries are switched off)."""
    if not group:
        return []
    return [
        instantiate(conf, _convert_="all", **kwargs)
        for conf in group.values()
        if isinstance(conf, DictConfig) and "_target_" in conf
    ]


def user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind ``err`` (Hydra wraps errors raised while instantiating), or None;
    a mandatory config value left unset counts as one."""
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        if isinstance(err, MissingMandatoryValue):  # a `???` in the config that nobody set
            key = getattr(err, "full_key", None) or "a key"
            return UserError(
                f"{key} has no value (it is ??? in the config): set it on the command line, "
                f"e.g. {key}=<value>."
            )
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def tta_callback(cfg: DictConfig, datamodule):
    """The callback that also tests with ``cfg.tta``'s views (mirroring and interpolation as the
    data's), or None for ``tta=none`` and for multi-task data."""
    import logging

    if not cfg.get("tta"):
        return None
    if getattr(datamodule, "tasks", None) is not None:
        logging.getLogger("run").info(
            "Test-time augmentation averages class probabilities: multi-task runs skip it."
        )
        return None
    callback = instantiate(
        cfg.tta,
        mirror_invariant=datamodule.mirror_invariant,
        interpolation=datamodule.interpolation,  # resolved (the backbone's when data says null)
    )
    return callback if callback.tta.enabled else None
