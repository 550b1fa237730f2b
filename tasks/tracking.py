"""Experiment trackers: wandb without an account, one wandb group per multirun, secret-free configs.

- :func:`wandb_mode` decides where wandb runs go: ``WANDB_MODE`` or the config when set, else
  ``online`` when you are logged in (``WANDB_API_KEY`` or a ``wandb login`` entry in ``~/.netrc``),
  else ``offline``: runs are written to ``<run dir>/wandb/offline-run-*`` and uploaded later with
  ``wandb sync``. Nothing ever needs an account or the network.
- :func:`run_labels` names a run after its Hydra job: the group is the multirun's sweep directory
  (every job of ``python run.py -m ...`` in one group), the name the job's overrides
  (``model.optimizer.lr=0.001,seed=2``) and the job type the same without the seed (one job type
  per hyperparameter setting: the members of one seed ensemble).
- :func:`wandb_logger` and :func:`mlflow_logger` build Lightning loggers with those labels.
- :func:`loggable_config` is the config every logger records: resolved, but never with the value
  of an environment variable, and with secrets masked.

Importing this module imports neither wandb nor Lightning.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "image-transfer"
WANDB_MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# overrides that say nothing about the model: left out of run names (as from ensemble settings)
UNLABELLED = ("paths", "logger", "hydra", "hparams_search")
MAX_LABEL = 64  # wandb's limit for tags and job types
MASK = "***"
_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
_ENV_INTERPOLATION = re.compile(r"\$\{\s*(oc\.env|env)\s*:")
_announced: set[str] = set()


# ---------------------------------------------------------------------------- where runs go
def wandb_mode(
    mode: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    netrc_file: str | Path | None = None,
) -> tuple[str, str]:
    """``(mode, why)``: ``mode`` if given, else ``$WANDB_MODE``, else online when logged in.

    Logged in means ``WANDB_API_KEY`` is set or ``~/.netrc`` (``$NETRC``) holds a password for
    the wandb host (``$WANDB_BASE_URL``, default ``api.wandb.ai``), which ``wandb login`` writes.
    """
    env = os.environ if environ is None else environ
    if mode is not None:
        chosen, why = _check_mode(mode, "logger.wandb.mode"), f"logger.wandb.mode={mode}"
    elif env.get("WANDB_MODE"):
        chosen, why = (
            _check_mode(env["WANDB_MODE"], "WANDB_MODE"),
            f"WANDB_MODE={env['WANDB_MODE']}",
        )
    elif env.get("WANDB_API_KEY"):
        chosen, why = "online", "WANDB_API_KEY is set"
    elif _netrc_login(env, netrc_file):
        chosen, why = "online", "logged in (wandb login)"
    else:
        chosen, why = "offline", "no wandb login found"
    return chosen, why


WANDB_URL = "https://api.wandb.ai"
REACH_TIMEOUT_S = 3.0  # how long a tracker's server may take to accept a connection


def reachable(url: str, *, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds
    (a compute node without network answers False at once or after ``timeout``)."""
    import socket

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _online_if_reachable(chosen: str, why: str, *, save_dir) -> tuple[str, str]:
    """``online`` stays online only when wandb's server answers; else offline, with one warning
    and the command that uploads the run later (training never waits on a tracker)."""
    url = os.environ.get("WANDB_BASE_URL") or WANDB_URL
    if chosen != "online" or reachable(url):
        return chosen, why
    host = urlparse(url).hostname
    log.warning(
        "wandb: %s cannot be reached (no network?): this run logs offline; upload it later "
        "with `wandb sync %s/wandb/offline-run-*`. Training is not affected.",
        host,
        save_dir,
    )
    return "offline", f"{why}, but {host} cannot be reached"


def _check_mode(mode: str, source: str) -> str:
    value = _MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
    if value not in WANDB_MODES:
        raise UserError(
            f"{source}='{mode}' is not a wandb mode: use one of {', '.join(WANDB_MODES)} "
            "(or leave it unset: online when logged in, else offline)."
        )
    return value


def _netrc_login(env: Mapping[str, str], netrc_file: str | Path | None) -> bool:
    path = Path(netrc_file or env.get("NETRC") or Path.home() / ".netrc").expanduser()
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entry = netrc.netrc(str(path)).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _announce(key: str, message: str, *args) -> None:
    """Log ``message`` once per process (and only on the global rank 0)."""
    if key in _announced or not is_rank_zero():
        return
    _announced.add(key)
    log.info(message, *args)


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_rank_zero(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the global rank 0 (the one that writes logs, metrics, files).

    Read from the variables that torchrun, SLURM and Lightning's DDP launcher set; a process
    with none of them set is rank 0.
    """
    env = os.environ if environ is None else environ
    return all(int(env[v]) == 0 for v in RANK_VARIABLES if env.get(v, "").strip().isdigit())


# ---------------------------------------------------------------------------- run labels
@dataclass(frozen=True)
class RunLabels:
    """How trackers name a run: its group (the multirun), name and job type."""

    group: str
    name: str
    job_type: str


def run_labels(*, seed: Any = None, run_dir: str | Path | None = None) -> RunLabels:
    """Labels of the current Hydra job (``run_dir`` names the group outside of Hydra).

    group: the sweep directory's name in a multirun, else the run directory's name.
    name: the job's overrides, sorted, without those of :data:`UNLABELLED` (where files and
    logs go), then the seed.
    job_type: the same without the seed (one value per hyperparameter setting), or ``default``;
    at most 64 characters (wandb's limit; a cut label ends with a hash of the whole).
    """
    from hydra.types import RunMode

    hydra = _hydra_config()
    overrides = []
    group = Path(run_dir).name if run_dir else "runs"
    if hydra is not None:
        multirun = OmegaConf.select(hydra, "mode", default=None) == RunMode.MULTIRUN
        where = "sweep.dir" if multirun else "runtime.output_dir"
        found = OmegaConf.select(hydra, where, default=None, throw_on_missing=False)
        group = Path(str(found)).name if found else group
        overrides = list(OmegaConf.select(hydra, "overrides.task", default=[]) or [])
    setting = sorted(
        {
            key: item
            for key, item in (_override_item(o) for o in overrides)
            if key != "seed" and key.split(".")[0].split("/")[0] not in UNLABELLED
        }.items()
    )
    setting_text = ",".join(item for _, item in setting)
    name = ",".join(filter(None, [setting_text, f"seed={seed}" if seed is not None else ""]))
    return RunLabels(
        group=group, name=name or "default", job_type=short_label(setting_text or "default")
    )


def _hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _override_item(override: str) -> tuple[str, str]:
    item = str(override).lstrip("+~")
    return item.split("=", 1)[0], item


def short_label(text: str, limit: int = MAX_LABEL) -> str:
    """``text`` cut to ``limit`` characters, a hash of the whole keeping cut labels distinct."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:6]
    return f"{text[: limit - 7]}~{digest}"


# ---------------------------------------------------------------------------- loggers
def wandb_logger(
    *,
    save_dir: str | Path,
    project: str | None = None,
    entity: str | None = None,
    mode: str | None = None,
    group: str | None = None,
    name: str | None = None,
    job_type: str | None = None,
    seed: Any = None,
    tags: Sequence[str] = (),
    log_model: bool = False,
    settings: Mapping[str, Any] | None = None,
    **init_kwargs: Any,
):
    """A Lightning ``WandbLogger`` writing into ``save_dir``, labelled by :func:`run_labels`.

    ``mode``: see :func:`wandb_mode` (the choice is logged once per process). ``settings``:
    ``wandb.Settings`` fields (the defaults in ``conf/logger/wandb.yaml`` keep start-up cheap).
    Further keyword arguments go to ``wandb.init``.
    """
    wandb = _require("wandb", "wandb")
    from pytorch_lightning.loggers import WandbLogger

    chosen, why = _online_if_reachable(*wandb_mode(mode), save_dir=save_dir)
    where = {
        "online": "to wandb and to <run dir>/wandb/",
        "offline": "to <run dir>/wandb/offline-run-*; upload them later with `wandb sync <dir>`",
        "disabled": "nowhere",
    }[chosen]
    _announce("wandb", "wandb: %s (%s): runs go %s", chosen, why, where)
    if log_model and chosen != "online":
        _announce("wandb-log-model", "wandb: log_model needs online mode; checkpoints stay local.")
        log_model = False
    labels = run_labels(seed=seed, run_dir=save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        save_dir=str(save_dir),
        project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=entity,
        mode=chosen,
        group=group or labels.group,
        name=name or labels.name,
        job_type=short_label(job_type or labels.job_type),
        tags=[short_label(str(t)) for t in tags or ()],
        log_model=log_model,
        settings=wandb.Settings(**dict(settings or {})),
        **init_kwargs,
    )
    # Lightning always passes anonymous=None, which wandb answers with a deprecation warning
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


def mlflow_logger(
    *,
    tracking_uri: str,
    experiment_name: str = DEFAULT_PROJECT,
    run_name: str | None = None,
    seed: Any = None,
    tags: Mapping[str, Any] | None = None,
    save_dir: str | Path | None = None,
    **kwargs: Any,
):
    """A Lightning ``MLFlowLogger``; runs tagged with :func:`run_labels`' group and job type.

    An ``http(s)`` ``tracking_uri`` whose server does not answer within a few seconds (a compute
    node without network) is replaced, with one warning, by a local file store in ``save_dir``
    (default: the working directory): the run is logged, and training never waits on it.

    A ``file:`` ``tracking_uri`` is MLflow's local file store (no server): MLflow 3 only accepts
    it with ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here for this process.
    """
    _require("mlflow", "mlflow-skinny")
    from pytorch_lightning.loggers import MLFlowLogger

    if tracking_uri.startswith(("http://", "https://")) and not reachable(tracking_uri):
        local = f"file:{Path(save_dir or '.').resolve()}/mlruns"
        log.warning(
            "mlflow: %s cannot be reached (no network?): this run logs to the local store %s "
            "instead. Training is not affected.",
            tracking_uri,
            local,
        )
        tracking_uri = local
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        Path(tracking_uri[len("file:") :]).expanduser().mkdir(parents=True, exist_ok=True)
    labels = run_labels(seed=seed)
    _announce("mlflow", "mlflow: runs go to %s (experiment %s)", tracking_uri, experiment_name)
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name or labels.name,
        tracking_uri=tracking_uri,
        tags={"group": labels.group, "job_type": labels.job_type, **dict(tags or {})},
        **kwargs,
    )


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"The {module} logger needs the `{package}` package: `pip install {package}`, or "
            "pick another logger (e.g. logger=csv)."
        ) from err


# ---------------------------------------------------------------------------- the logged config
def loggable_config(cfg: DictConfig) -> dict:
    """The job's config as plain python for loggers: resolved, Hydra's node left out, and safe.

    - a value taken from an environment variable (``${oc.env:...}``) is kept as its text, never
      its value;
    - values of keys named like secrets (``api_key``, ``token``, ``password``, ...) are masked;
    - the value of any secret-named environment variable is masked wherever it appears.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    out = {key: _resolved(cfg, key, value) for key, value in raw.items() if key != "hydra"}
    return _mask(out, _secret_values(os.environ))


def _resolved(node, key, raw):
    """``node[key]`` resolved, except interpolations that read the environment (or fail)."""
    if isinstance(raw, str) and "${" in raw:
        if _ENV_INTERPOLATION.search(raw):
            return raw
        try:
            value = node[key]
        except Exception:  # e.g. ${hydra:...} outside of a Hydra run
            return raw
        if isinstance(value, (DictConfig, ListConfig)):
            return _walk(value)
        return value
    if isinstance(raw, (dict, list)):
        return _walk(node[key])
    return raw


def _walk(node):
    raw = OmegaConf.to_container(node, resolve=False)
    if isinstance(raw, dict):
        return {key: _resolved(node, key, value) for key, value in raw.items()}
    return [_resolved(node, i, value) for i, value in enumerate(raw)]


def _secret_values(environ: Mapping[str, str]) -> list[str]:
    return sorted(
        {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 6},
        key=len,
        reverse=True,
    )


def _mask(value, secrets: list[str], key: str = ""):
    if isinstance(value, dict):
        return {k: _mask(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, secrets, key) for v in value]
    if _SECRET_NAME.search(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
    return value


# ---------------------------------------------------------------------------- the seed report
REPORT_SECTIONS = ("test", "test_tta", "calibration", "intervals", "gains")


def report_numbers(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an ensemble report (``report.json``) as flat ``a/b/c`` keys: the members'
    mean, std, the ensemble, its gain, temperatures, every interval and paired gain (lists, such
    as per-member rows, are left out: the intervals name each member)."""
    out: dict[str, float] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        elif isinstance(node, (int, float)) and node == node:  # bools too; not NaN
            out[prefix] = float(node)

    for section in REPORT_SECTIONS:
        if section in report:
            walk(report[section], section)
    return out


def report_to_wandb(out_dir: str | Path, report: Mapping[str, Any], *, wandb_config, group: str):
    """One wandb run per ensemble report, in the multirun's ``group`` with job type
    ``ensemble``: :func:`report_numbers` as its summary and the report's PNGs as images. The
    mode follows ``logger.wandb`` (offline without a login); ``disabled`` logs nothing."""
    wandb = _require("wandb", "wandb")
    out_dir = Path(out_dir)
    chosen, _ = _online_if_reachable(*wandb_mode(wandb_config.get("mode")), save_dir=out_dir)
    if chosen == "disabled":
        return None
    settings = dict(wandb_config.get("settings") or {})
    run = wandb.init(
        dir=str(out_dir),
        project=wandb_config.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=wandb_config.get("entity"),
        group=short_label(wandb_config.get("group") or group),  # where the jobs went
        job_type="ensemble",
        name=short_label(f"ensemble {report.get('name') or ''}".strip()),
        mode=chosen,
        settings=wandb.Settings(**settings),
    )
    try:
        run.summary.update(report_numbers(report))
        images = {p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))}
        if images:
            run.log(images)
    finally:
        run.finish()
    return run
