"""The commands that README.md and docs/ show, as a user would type them.

A command is a line of a fenced code block that starts with a program (``python``, ``make``,
``wandb``, ...; continuation lines ending in ``\\`` joined), or an inline code span that starts
with ``python run.py`` or ``make``. A command is *marked* when its own trailing comment, or the
comment lines right above it, say that it needs the internet, a GPU or a cluster: such commands
are shown but not run by the suite. ``tests/test_documented_commands.py`` runs every other one.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"python", "make", "wandb", "mlflow", "tensorboard", "pip", "pytest", "optuna"}
MARK = re.compile(r"needs (the internet|a GPU|\d+ GPUs|a SLURM cluster|a cluster)", re.I)
INLINE = re.compile(r"`((?:python run\.py|make)\b[^`]*)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"<([a-z][a-z0-9 ._-]*)>")  # <run dir> -> <run_dir>: one shell word


@dataclass(frozen=True)
class Command:
    where: str  # "docs/visualize.md:4"
    env: tuple[tuple[str, str], ...]  # VAR=value prefixes
    argv: tuple[str, ...]  # the program and its arguments, shell-split
    needs: str | None  # "the internet", "a GPU", ... when marked; None when the suite runs it

    @property
    def text(self) -> str:
        env = [f"{k}={v}" for k, v in self.env]
        return " ".join([*env, *(shlex.quote(a) for a in self.argv)])

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def documented_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _where(path: Path, index: int) -> str:
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return f"{name}:{index + 1}"


def _command(where: str, line: str, comments: list[str]) -> Command | None:
    line = PLACEHOLDER.sub(lambda m: "<" + m.group(1).replace(" ", "_") + ">", line)
    try:
        words = shlex.split(line, comments=True)
    except ValueError as err:  # unbalanced quotes: a broken command in the docs
        raise ValueError(f"{where}: cannot split {line!r}: {err}") from None
    env = []
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env.append((key, value))
    if not words or words[0] not in PROGRAMS or "..." in words:  # "..." elides: not a command
        return None
    trailing = line.split(" #", 1)[1] if " #" in line else ""
    mark = MARK.search(" ".join([trailing, *comments]))
    return Command(where, tuple(env), tuple(words), mark.group(1) if mark else None)


def _fenced(path: Path, lines: list[str], start: int, end: int) -> list[Command]:
    """The commands of one fenced block (``lines[start:end]``, without the fences)."""
    found, comments, i = [], [], start
    while i < end:
        line, first = lines[i].strip(), i
        if line.startswith("#"):
            comments.append(line)
            i += 1
            continue
        while line.endswith("\\") and i + 1 < end:  # a command continued on the next line
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        command = _command(_where(path, first), line, comments)
        if command is not None:
            found.append(command)
        comments = []
        i += 1
    return found


def documented_commands(paths: list[Path] | None = None) -> list[Command]:
    """Every command of README.md and docs/*.md, in reading order."""
    found = []
    for path in paths or documented_files():
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].lstrip().startswith("```"):
                end = next(
                    (j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```")),
                    len(lines),
                )
                found += _fenced(path, lines, i + 1, end)
                i = end + 1
                continue
            for span in INLINE.findall(lines[i]):
                command = _command(_where(path, i), span, [])
                if command is not None:
                    found.append(command)
            i += 1
    return found
