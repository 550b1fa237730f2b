"""The house rules, checked on the source: who may import whom, every config target exists,
and no product function is longer than a reader can hold (without a reason written next to it).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "callbacks", "tasks")
# package -> the packages (and run.py) it must never import, at any depth, even inside functions
FORBIDDEN = {
    "datamodules": {"lightning_modules", "callbacks", "tasks", "run"},
    "lightning_modules": {"callbacks", "tasks", "run"},
    "callbacks": {"tasks", "run"},
    "tasks": {"run"},
    "tests": {"run"},
}
MAX_FUNCTION_LINES = 60
REASON = "# long:"  # a comment line right above a longer function says why it stays in one piece


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports (top-level or inside functions), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def layer_violations() -> list[str]:
    found = []
    for package, banned in FORBIDDEN.items():
        for path in _python_files(package):
            for name in sorted(imported_names(path)):
                if name.split(".")[0] in banned:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_import_rules_hold():
    """run.py <- tasks <- callbacks <- lightning_modules <- datamodules; nothing imports run.py."""
    assert layer_violations() == []


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tasks.train import train\n    import run\n")
    assert {"tasks.train", "tasks.train.train", "run"} <= imported_names(probe)


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


CONFIG_TARGETS = sorted(
    {
        (target, str(path.relative_to(ROOT)))
        for path in (ROOT / "conf").rglob("*.yaml")
        for target in _targets(yaml.safe_load(path.read_text()))
        if not target.startswith("${")
    }
)


def test_the_configs_have_targets():
    assert len(CONFIG_TARGETS) > 20  # the scan sees the config groups


@pytest.mark.parametrize(("target", "config"), CONFIG_TARGETS)
def test_every_config_target_imports(target, config):
    """A moved or renamed class must fail here, not in a user's run."""
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:  # a class nested in a class: one level more
        outer, _, inner = module.rpartition(".")
        if not outer:
            raise AssertionError(f"{config}: _target_ {target} does not import") from err
        obj = getattr(getattr(importlib.import_module(outer), inner), name)
    assert callable(obj), f"{config}: {target} is not callable"


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions over ``limit`` lines without a ``# long: <reason>`` comment right above."""
    found = []
    for path in paths:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > limit and not above.startswith(REASON):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                found.append(f"{where}:{node.lineno} {node.name} ({length})")
    return found


def test_no_product_function_is_over_60_lines_without_a_reason():
    assert long_functions([*_python_files(*PACKAGES), ROOT / "run.py"]) == []


def test_the_length_check_counts_and_honours_a_reason(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    plain = tmp_path / "plain.py"
    plain.write_text("def f():\n" + body)
    reasoned = tmp_path / "reasoned.py"
    reasoned.write_text("# long: one table of cases, clearer whole\ndef f():\n" + body)
    assert [s.split(" ", 1)[1] for s in long_functions([plain, reasoned])] == ["f (71)"]
