"""Images listed in a CSV file with one label column per task: multi-task data.

    image,age,sex,ethnicity,split
    faces/0001.jpg,34,F,asian,train
    faces/0002.jpg,,M,white,train        <- no age label: left out of the age loss only
    faces/0003.jpg,61,F,,test

Image paths are relative to ``root`` (default: the CSV file's folder). Each task names its column
and type (``classification``, ``binary``, ``regression``); empty cells and ``missing_values``
mean "no label for this task". An optional ``split_column`` (``train``/``val``/``test``) gives
the splits; otherwise the data module carves validation and test images out of the rows,
stratified by the ``stratify`` task.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from datamodules.errors import UserError
from datamodules.sources.base import TASK_TYPES, Pool, SourceData
from datamodules.sources.folder import FileLoader

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
BINARY_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1, "0.0": 0, "1.0": 1}
MISSING = ("", "na", "n/a", "nan", "none", "null")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _sorted_classes(values: set[str]) -> list[str]:
    """Class names in a natural order: numerically when all are numbers, else alphabetically."""
    if values and all(_number(v) is not None for v in values):
        return sorted(values, key=lambda v: (_number(v), v))
    return sorted(values)


class CsvSource:
    """A CSV file listing images and their labels, one column per task.

    Args:
        path: the CSV file (comma-separated, a header row).
        tasks: ``{task: type}`` or ``{task: {type, column, classes}}``: ``column`` defaults to the
            task's name; ``classes`` fixes the class names and their order (classification; for
            binary the negative then the positive value). Without it, classes are the values
            found, in natural order; binary columns may hold 0/1, true/false or yes/no.
        image_column: the column with the image paths.
        root: the folder image paths are relative to (default: the CSV file's folder).
        split_column: a column with ``train``/``val``/``test`` per row, or None.
        stratify: the classification/binary task whose classes stratify the split (default:
            the first one; rows without its label join its most frequent class).
        missing_values: cell values meaning "no label" (case-insensitive), besides empty cells.

    After :meth:`load`, :attr:`tasks` holds ``{task: {"type", "class_names"}}``.
    """

    def __init__(
        self,
        *,
        path: str,
        tasks: Mapping,
        image_column: str = "image",
        root: str | None = None,
        split_column: str | None = None,
        stratify: str | None = None,
        missing_values: Sequence[str] = MISSING,
    ) -> None:
        if not tasks:
            raise UserError(
                "data.source.tasks is empty: name at least one label column and its type, "
                "e.g. data.source.tasks='{age: regression, sex: binary}'."
            )
        self.path = Path(str(path)).expanduser()
        self.task_conf = {str(k): self._task_conf(str(k), v) for k, v in tasks.items()}
        self.image_column, self.split_column = image_column, split_column
        self.root = Path(str(root)).expanduser() if root else self.path.parent
        self.missing = {str(v).strip().lower() for v in missing_values} | {""}
        self.stratify = stratify
        self.tasks: dict[str, dict] | None = None

    @staticmethod
    def _task_conf(name: str, conf) -> dict:
        conf = {"type": conf} if isinstance(conf, str) else dict(conf or {})
        if conf.get("type") not in TASK_TYPES:
            raise UserError(
                f"data.source.tasks.{name} has type '{conf.get('type')}': use one of "
                f"{', '.join(TASK_TYPES)}."
            )
        conf.setdefault("column", name)
        return conf

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.path.is_file():
            raise UserError(
                f"CSV file '{self.path}' does not exist: set data.root (or data.source.path) to "
                "a CSV with an image column and one column per task."
            )
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [
                {k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader
            ]
        needed = [self.image_column] + [c["column"] for c in self.task_conf.values()]
        needed += [self.split_column] if self.split_column else []
        absent = [c for c in needed if c not in header]
        if absent:
            raise UserError(
                f"'{self.path}' has no column(s) {absent} (its columns: {header}): fix the names "
                "in data.source (image_column, tasks, split_column)."
            )
        if not rows:
            raise UserError(f"'{self.path}' lists no images: add rows below its header.")
        return header, rows

    def _is_missing(self, value: str) -> bool:
        return value.strip().lower() in self.missing

    def _column(self, name: str, conf: dict, rows: list[dict]) -> tuple[np.ndarray, list | None]:
        """A task's labels (float32, NaN = missing) and its class names."""
        column = conf["column"]
        cells = [row[column] for row in rows]
        present = [(i, v) for i, v in enumerate(cells) if not self._is_missing(v)]
        out = np.full(len(rows), np.nan, dtype=np.float32)
        kind = conf["type"]
        if kind == "regression":
            for i, v in present:
                value = _number(v)
                if value is None:
                    raise UserError(
                        f"'{self.path}' line {i + 2}: '{v}' in column '{column}' is not a number "
                        f"(task '{name}' is a regression): fix the cell, or leave it empty."
                    )
                out[i] = value
            return out, None
        classes = conf.get("classes")
        values = {v for _, v in present}
        if classes is not None:
            names = [str(c) for c in classes]
        elif kind == "binary" and {v.lower() for v in values} <= set(BINARY_WORDS):
            names = None  # 0/1, true/false, yes/no
        else:
            names = _sorted_classes(values)
        if kind == "binary" and names is not None and len(names) != 2:
            raise UserError(
                f"Binary task '{name}' has {len(names)} distinct values in column '{column}' "
                f"({names[:6]}): it needs exactly two, or make it a classification task."
            )
        if kind == "classification" and len(names) < 2:
            raise UserError(
                f"Classification task '{name}' has {len(names)} class(es) in column '{column}': "
                "it needs at least two."
            )
        if names is None:
            for i, v in present:
                out[i] = BINARY_WORDS[v.lower()]
            return out, ["0", "1"]
        index = {n: k for k, n in enumerate(names)}
        unknown = sorted(values - set(index))
        if unknown:
            raise UserError(
                f"Column '{column}' of '{self.path}' holds {unknown[:6]}, which are not among "
                f"task '{name}''s classes {names}: add them to its classes or fix the cells."
            )
        for i, v in present:
            out[i] = index[v]
        return out, names

    # ------------------------------------------------------------------ the source
    def load(self) -> SourceData:
        _, rows = self._read()
        paths = []
        for i, row in enumerate(rows):
            value = row[self.image_column]
            if not value:
                raise UserError(
                    f"'{self.path}' line {i + 2} has no image path in column "
                    f"'{self.image_column}': fill it in or remove the row."
                )
            paths.append(self.root / value)
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise UserError(
                f"{len(absent)} image(s) listed in '{self.path}' do not exist, e.g. {absent[:3]}: "
                "image paths are relative to data.source.root (default: the CSV's folder)."
            )
        columns, tasks = [], {}
        for name, conf in self.task_conf.items():
            labels, names = self._column(name, conf, rows)
            if np.isnan(labels).all():
                raise UserError(
                    f"Task '{name}' has no label at all in column '{conf['column']}': fill in "
                    "some labels or remove the task."
                )
            columns.append(labels)
            tasks[name] = {"type": conf["type"], "class_names": names}
        self.tasks = tasks
        labels = np.stack(columns, axis=1)
        strat, strat_names = self._strata(labels)
        ids = [row[self.image_column] for row in rows]
        if len(set(ids)) != len(ids):
            raise UserError(f"'{self.path}' lists some images twice: give each image one row.")
        if not self.split_column:
            pool = Pool(load=FileLoader(paths), targets=strat, ids=ids, labels=labels)
            return SourceData(class_names=strat_names, train=pool)
        pools = {}
        split_of = []
        for i, row in enumerate(rows):
            split = SPLIT_NAMES.get(row[self.split_column].strip().lower())
            if split is None:
                raise UserError(
                    f"'{self.path}' line {i + 2}: split '{row[self.split_column]}' in column "
                    f"'{self.split_column}' is not train, val or test."
                )
            split_of.append(split)
        split_of = np.asarray(split_of)
        for split in ("train", "val", "test"):
            rows_in = np.flatnonzero(split_of == split)
            if len(rows_in) == 0:
                continue
            pools[split] = Pool(
                load=FileLoader([paths[r] for r in rows_in]),
                targets=strat[rows_in],
                ids=[ids[r] for r in rows_in],
                labels=labels[rows_in],
            )
        if "train" not in pools:
            raise UserError(f"No row of '{self.path}' is in the train split: mark some as train.")
        return SourceData(class_names=strat_names, **pools)

    def _strata(self, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """The class of the ``stratify`` task per row (rows without one: its most common class)."""
        names = list(self.task_conf)
        choice = self.stratify
        if choice is None:
            choice = next((n for n in names if self.task_conf[n]["type"] != "regression"), None)
        elif choice not in self.task_conf or self.task_conf[choice]["type"] == "regression":
            raise UserError(
                f"data.source.stratify={choice}: name a classification or binary task "
                f"({', '.join(n for n in names if self.task_conf[n]['type'] != 'regression')})."
            )
        if choice is None:
            return np.zeros(len(labels), dtype=np.int64), ["all"]
        column = labels[:, names.index(choice)]
        known = ~np.isnan(column)
        strat = np.zeros(len(column), dtype=np.int64)
        strat[known] = column[known].astype(np.int64)
        class_names = self.tasks[choice]["class_names"]
        counts = np.bincount(strat[known], minlength=len(class_names))
        strat[~known] = int(np.argmax(counts))
        return strat, [f"{choice}={c}" for c in class_names]
