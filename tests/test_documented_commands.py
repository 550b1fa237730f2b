"""Every command that README.md and docs/ show runs as written, or is marked as needing what the
suite does not have (the internet, a GPU, a cluster).

The commands run in a user's folder of their own (a copy of ``run.py`` beside the project's
``conf/`` and packages, image folders where the commands name them, ``~`` in it), in reading
order, with small-size overrides appended where a command trains (one epoch of a couple of
batches; two Optuna trials). Placeholders (``<run>``, ``<date>_<id>``, ...) become the run and sweep
directories that the README's own first commands made. A command that stops working fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from documented_commands import Command, documented_commands
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Appended to every command that trains; a later override of the same key wins.
SMALL = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]
# Appended only where the command does not set the key itself.
QUIET = {
    "logger": "logger=csv",  # no wandb service process per run (wandb has commands of its own)
    "data.num_workers": "data.num_workers=0",
    "callbacks": "++callbacks.rich_progress_bar=null",
}
FIRST_RUN = ("python", "run.py")  # README: the first run, <run>
FIRST_SWEEP = ("python", "run.py", "-m", "seed=1,2,3")  # README: the main job, <date>_<id>


def _keys(args) -> set[str]:
    return {a.lstrip("~+").split("=", 1)[0].split(".")[0] for a in args} | {
        a.lstrip("~+").split("=", 1)[0] for a in args
    }


def small_overrides(command: Command) -> list[str]:
    """What the suite appends to a ``python run.py`` command so that it trains in seconds."""
    args = list(command.argv[2:])
    if any(a.startswith("--") or a.startswith("resume=") for a in args):
        return []  # --help, --cfg; resume= continues a run with its own saved config
    keys = _keys(args)
    extra = list(SMALL)
    if any(a.startswith("ckpt_path=") and a.endswith("last.ckpt") for a in args):
        extra.append("trainer.max_epochs=2")  # training on from a one-epoch run: one more epoch
    for a in args:  # unfreezing milestones must fall inside the training
        if a.startswith("finetune.callback.milestones="):
            last = max(int(m) for m in re.findall(r"\d+", a.split("=", 1)[1]))
            extra.append(f"trainer.max_epochs={last + 1}")
    if any(a in ("task=lr_find", "model.optimizer.lr=auto") for a in args):
        extra.append("lr_find.steps=20")
    if any(a.startswith("hparams_search=") for a in args):
        extra.append("hydra.sweeper.n_trials=2")
    for key, override in QUIET.items():
        wandb_env = key == "logger" and any(k.startswith("WANDB") for k, _ in command.env)
        joblib = key == "data.num_workers" and "hydra/launcher=joblib" in args
        if key not in keys and not wandb_env and not joblib:
            extra.append(override)
    return extra


def justified(command: Command) -> bool:
    """A mark names something the command really needs."""
    text = command.text
    needs = {
        "the internet": command.argv[0] == "wandb"
        or "pretrained=true" in text
        or bool(re.search(r"\bdata=(cifar10|cifar100|pets|flowers102)\b", text)),
        "a GPU": bool(re.search(r"trainer=(gpu|bf16)", text)),
        "a SLURM cluster": "hydra/launcher=slurm" in text,
    }
    if re.fullmatch(r"\d+ GPUs", command.needs or ""):
        return "trainer.devices=" in text and "accelerator=cpu" not in text
    return needs.get(command.needs or "", False)


def _unique(commands: list[Command]) -> list[Command]:
    seen, out = set(), []
    for c in commands:
        if (c.env, c.argv) not in seen:
            seen.add((c.env, c.argv))
            out.append(c)
    return out


def test_documented_commands_are_found_and_marks_are_justified():
    commands = documented_commands()
    assert len(commands) > 40, "the docs show dozens of commands: the parser lost them"
    marked = [c for c in commands if c.needs]
    unjustified = [str(c) for c in marked if not justified(c)]
    assert not unjustified, f"marked without a reason in the command: {unjustified}"
    for c in commands:  # what the suite cannot have must be marked, not run and failed
        if c.needs is None and c.argv[0] == "python":
            assert not re.search(r"trainer=(gpu|bf16)|pretrained=true|launcher=slurm", c.text), c
    programs = {c.argv[0] for c in commands if c.needs is None}
    assert programs <= {"python", "make"}, f"unmarked commands the suite cannot run: {programs}"


def test_seed_sweeps_run_two_seeds_except_the_main_job():
    def command(*argv):
        return Command("x.md:1", (), ("python", "run.py", *argv), None)

    grid = command("-m", "augment=none,light", "seed=1,2,3", "trainer.max_epochs=6")
    assert fewer_seeds(grid) == ["-m", "augment=none,light", "seed=1,2", "trainer.max_epochs=6"]
    assert fewer_seeds(command(*FIRST_SWEEP[2:])) == list(FIRST_SWEEP[2:])
    assert fewer_seeds(command("seed=3")) == ["seed=3"]  # one run: nothing to cut
    assert fewer_seeds(command("-m", "seed=1,2")) == ["-m", "seed=1,2"]


def test_the_parser_reads_blocks_continuations_marks_and_inline_spans(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent("""\
        Run `python run.py seed=2` or `make help`; `python run.py -m ...` elides.
        ```bash
        # needs a GPU
        python run.py trainer=gpu \\
            seed=1                      # the next line is not marked
        WANDB_MODE=offline python run.py 'ckpt_path=[<run dir>,<b.ckpt>]'  # quoted
        image,age                       (not a command)
        ```
        """)
    )
    found = documented_commands([page])
    assert [c.where for c in found] == ["page.md:1", "page.md:1", "page.md:4", "page.md:6"]
    texts = [(c.argv, c.env, c.needs) for c in found]
    assert texts == [
        (("python", "run.py", "seed=2"), (), None),
        (("make", "help"), (), None),
        (("python", "run.py", "trainer=gpu", "seed=1"), (), "a GPU"),
        (
            ("python", "run.py", "ckpt_path=[<run_dir>,<b.ckpt>]"),
            (("WANDB_MODE", "offline"),),
            None,
        ),
    ]


def _images(folder: Path, labels, per_class: int, *, flat: bool = False) -> None:
    """Digits from scikit-learn as 32x32 PNGs in class folders (or flat)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in labels:
        where = folder if flat else folder / f"class_{label}"
        where.mkdir(parents=True, exist_ok=True)
        picks = np.flatnonzero(digits.target == label)[:per_class]
        for i in picks:
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(where / f"{label}_{i}.png")


def _user_folder(tmp: Path) -> Path:
    """Where a user types the commands: run.py, the project beside it, their pictures, ~."""
    world = tmp / "project"
    world.mkdir(parents=True)
    (world / "run.py").write_text((ROOT / "run.py").read_text())
    for name in ("conf", "tasks", "lightning_modules", "datamodules", "callbacks", "tests"):
        (world / name).symlink_to(ROOT / name)
    _images(world / "pictures/cats_vs_dogs", [3, 8], 30)
    for split, n in (("train_dir", 24), ("val_dir", 8), ("test_dir", 8)):
        _images(world / split, [3, 8], n)
    _images(world / "home/new_scans", [1, 7], 3, flat=True)
    _images(world / "home/pictures/new_cats", [2, 5], 3, flat=True)
    return world


def _fill(argv, values: dict[str, list[str]]) -> list[str]:
    """Placeholders -> real directories; repeated ones take the next value of their list."""
    used: dict[str, int] = {}

    def one(match):
        name = match.group(0)
        assert name in values, f"no value for the placeholder {name}: add it to the test"
        k = used.get(name, 0)
        used[name] = k + 1
        return values[name][k % len(values[name])]

    argv = [a.replace("outputs/train/runs/<run>", "<run>") for a in argv]
    return [re.sub(r"<date>_<id>|<[a-z][a-z0-9._]*>", one, a) for a in argv]


def _module(command: Command) -> str | None:
    """``python -m tests.<module> ...``: a helper of the project's own (e.g. weights to convert)."""
    argv = command.argv
    return argv[2] if argv[:2] == ("python", "-m") and argv[2].startswith("tests.") else None


def _args(command: Command) -> list[str]:
    """What follows ``run.py`` (with the small-size overrides) or the module's name."""
    if _module(command):
        return list(command.argv[3:])
    return [*fewer_seeds(command), *small_overrides(command)]


def fewer_seeds(command: Command) -> list[str]:
    """A multirun's ``seed=a,b,c,...`` keeps its first two seeds (an ensemble of two exercises
    the same report), as an Optuna search keeps two trials; the README's main job keeps its three
    (later commands name its third member)."""
    args = list(command.argv[2:])
    if "-m" not in args or command.argv == FIRST_SWEEP:
        return args
    return [
        "seed=" + ",".join(a[5:].split(",")[:2])
        if a.startswith("seed=") and a.count(",") >= 2 and "(" not in a
        else a
        for a in args
    ]


def _paths(arg: str) -> list[str]:
    """The relative paths an argument names (its value, split at list and sweep separators)."""
    value = arg.split("=", 1)[-1]
    pieces = (p.strip("'\"") for p in re.split(r"[\[\],]", value))
    return [p for p in pieces if "/" in p and not p.startswith("/")]


def _cost(command: Command) -> float:
    """A rough cost in seconds, from measured runs: a task that trains nothing (eval, predict,
    ensemble, visualize, ...) ~2.5 s; a training run 3 s plus, per job of a multirun (its swept
    values multiplied), ~3.5 s, ~1.5 s for the small multi-task data, ~5 s with resnet18, ~9 s
    with EfficientNet-Lite's ImageNet weights; +12 s for two DDP processes."""
    if _module(command):
        return 4.0
    args = _args(command)
    text = " ".join(args)
    if any(a.startswith("--") for a in args):
        return 0.5
    task = next((a.split("=", 1)[1] for a in args if a.startswith("task=")), "train")
    if task not in ("train", "lr_find"):
        return 2.5
    jobs = 1
    if "-m" in command.argv:
        for a in args:
            value = a.split("=", 1)[-1]
            if "=" in a and "," in value and "[" not in value and "(" not in value:
                jobs *= value.count(",") + 1
    per_job = 3.5
    if "efficientnet_lite" in text or "imagenet_transfer" in text:
        per_job = 9.0
    elif "resnet18" in text:
        per_job = 5.0
    elif "multitask" in text:
        per_job = 1.5
    return 3 + per_job * jobs + (12 if "trainer=ddp" in text else 0)


def _balanced(commands: list[Command], head_start: int) -> tuple[list[Command], list[Command]]:
    """Two lists of commands for two runners of about the same cost; the first runner has
    ``head_start`` seconds of work already. A command that names a folder another one writes
    (``hydra.run.dir=``/``hydra.sweep.dir=``) runs after it in the same runner; a helper module's
    command (it writes files that configs name, e.g. weights) runs in both; reading order kept."""
    helpers = [i for i, c in enumerate(commands) if _module(c)]
    group = list(range(len(commands)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i, producer in enumerate(commands):
        made = [
            p
            for a in producer.argv
            if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
            for p in _paths(a)
        ]
        for j in range(i + 1, len(commands)):
            named = [p for a in commands[j].argv for p in _paths(a)]
            if any(n.startswith(m) for m in made for n in named):
                group[root(j)] = root(i)
    parts: dict[int, list[int]] = {}
    for i in range(len(commands)):
        if i not in helpers:
            parts.setdefault(root(i), []).append(i)
    load, lists = [head_start, 0], (list(helpers), list(helpers))
    for part in sorted(parts.values(), key=lambda ix: -sum(_cost(commands[i]) for i in ix)):
        k = 0 if load[0] <= load[1] else 1
        lists[k].extend(part)
        load[k] += sum(_cost(commands[i]) for i in part)
    return tuple([commands[i] for i in sorted(ix)] for ix in lists)


def _start(world: Path, commands: list[tuple[Command, list[str]]], name: str):
    """Run the commands one after another in ``world`` (a runner process of their own)."""
    plan = [
        {
            "where": c.where,
            "env": dict(c.env),
            "argv": argv,
            "module": _module(c),
            "subprocess": any(a.startswith(("trainer=ddp", "hydra/launcher=")) for a in argv),
        }
        for c, argv in commands
    ]
    (world.parent / f"{name}.json").write_text(json.dumps(plan))
    env = {
        **os.environ,
        "HOME": str(world / "home"),
        "PROJECT_ROOT": str(world),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests/command_runner.py"),
            f"../{name}.json",
            f"../{name}-results.json",
        ],
        cwd=world,
        env=env,
    )


def _results(world: Path, runner, name: str) -> list[dict]:
    try:
        runner.wait(timeout=1500)
    finally:
        runner.kill()
    results = world.parent / f"{name}-results.json"
    return json.loads(results.read_text()) if results.exists() else []


def _make_commands(commands: list[Command]) -> list[str]:
    """`make <target>` lines: each target exists, and what the README says it runs, it runs."""
    problems = []
    for c in commands:
        target = list(c.argv[1:])
        dry = subprocess.run(["make", "-n", *target], cwd=ROOT, capture_output=True, text=True)
        if dry.returncode != 0:
            problems.append(f"{c}: {dry.stderr.strip()}")
    readme = (ROOT / "README.md").read_text()
    for target, runs in re.findall(r"^make (\S+)\s+#.*then: (.+)$", readme, re.M):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        if runs.strip() not in dry.stdout.replace(".venv/bin/python ", "python "):
            problems.append(f"README says make {target} runs {runs!r}; it runs {dry.stdout!r}")
    shown = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True)
    problems += [
        f"make help does not list {t}"
        for t in ("run", "test", "bench")
        if f"make {t} " not in shown.stdout
    ]
    return problems


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_documented_command_runs(tmp_path):
    commands = [c for c in _unique(documented_commands()) if c.needs is None]
    problems = _make_commands([c for c in commands if c.argv[0] == "make"])
    runs = [c for c in commands if c.argv[:2] == ("python", "run.py") or _module(c)]
    plain = [c for c in runs if not re.search(r"<[a-z]", c.text)]
    first = [c for c in plain if c.argv in (FIRST_RUN, FIRST_SWEEP) and not c.env]
    first.sort(key=lambda c: c.argv != FIRST_RUN)
    # Two users' folders, one runner each (two cores): the README's first run and sweep, then
    # the commands that name them, in one; the other commands in the other.
    mine, other = _user_folder(tmp_path / "a"), _user_folder(tmp_path / "b")
    filled = [c for c in runs if c not in plain]
    # the plain commands split between the two folders by cost (the first one also runs the
    # README's first commands and those that name their outputs)
    head_start = sum(_cost(c) for c in first + filled)
    mine_plain, rest = _balanced([c for c in plain if c not in first], head_start)
    runner = _start(other, [(c, _args(c)) for c in rest], "plain")
    try:
        first_plan = [(c, _args(c)) for c in first]
        done = _results(mine, _start(mine, first_plan, "first"), "first")
        assert [d["rc"] for d in done] == [0, 0], f"the README's first commands failed: {done}"
        run_dir = next(d for d in done[0]["new_dirs"] if "/runs/" in d)
        sweep = next(d for d in done[1]["new_dirs"] if "/multiruns/" in d)
        values = {
            "<run>": [run_dir],
            "<run_dir>": [f"{sweep}/{i}" for i in range(3)],
            "<date>_<id>": [Path(sweep).name],
            "<sweep>": [Path(sweep).name],
            "<a.ckpt>": [f"{sweep}/0/checkpoints/best.ckpt"],
            "<b.ckpt>": [f"{sweep}/1/checkpoints/best.ckpt"],
        }
        filled_plan = [(c, _fill(_args(c), values)) for c in filled]
        done += _results(mine, _start(mine, filled_plan, "filled"), "filled")
        mine_plan = [(c, _args(c)) for c in mine_plain]
        done += _results(mine, _start(mine, mine_plan, "mine"), "mine")
        done += _results(other, runner, "plain")
    finally:
        runner.kill()
    expected = len(runs) + sum(1 for c in plain if _module(c))  # helpers run in both folders
    assert len(done) == expected, f"{expected - len(done)} commands did not finish in time"
    report = [
        f"{d['seconds']:7.1f} s  rc {d['rc']}  {d['where']}: "
        f"{'-m ' + d['module'] if d.get('module') else 'run.py'} {' '.join(d['argv'])}"
        for d in done
    ]
    (tmp_path / "report.txt").write_text("\n".join(report))
    if os.environ.get("DOCUMENTED_COMMANDS_REPORT"):
        Path(os.environ["DOCUMENTED_COMMANDS_REPORT"]).write_text("\n".join(report) + "\n")
    for d in done:
        if d["rc"] != 0:
            tail = Path(d["log"]).read_text()[-1500:]
            problems.append(f"{d['where']}: exit {d['rc']}: run.py {' '.join(d['argv'])}\n{tail}")
    assert not problems, "\n\n".join(problems)
