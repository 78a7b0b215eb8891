"""The layering the README's "Architecture" section promises: stage modules do not import each other.

A stage (data conversion, training, merge, quantize, generate, evaluate, clean-cache) reads what an earlier stage wrote
through the shared modules (`pcbvlm.runs`: run folders and checkpoints; `pcbvlm.model_folder`: published
model folders), never through the earlier stage's code, so that each can change alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib" / "pcbvlm"
# A module (`<name>.py`) or a package (`<name>/`, every module in it).
STAGES = ("datasets", "training", "merge", "quantize", "generate", "evaluate", "cache")


def stage_files(stage: str) -> list[Path]:
    package = LIB / stage
    return sorted(package.rglob("*.py")) if package.is_dir() else [LIB / f"{stage}.py"]


def pcbvlm_imports(path: Path) -> dict[str, int]:
    """Every pcbvlm module `path` imports (at the top or inside a function), with the first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "pcbvlm":  # `from pcbvlm import merge`
                names += [f"pcbvlm.{alias.name}" for alias in node.names]
        for name in names:
            if name == "pcbvlm" or name.startswith("pcbvlm."):
                found.setdefault(name.removeprefix("pcbvlm."), node.lineno)
    return found


def stage_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in STAGES else None


def test_every_stage_module_exists():
    # A renamed stage must be renamed here too, or the rule below would silently check nothing.
    assert [s for s in STAGES if not all(path.is_file() for path in stage_files(s))] == []


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_no_other_stage(stage):
    crossings = [
        f"{path.relative_to(LIB.parent)}:{line} imports pcbvlm.{module}"
        for path in stage_files(stage)
        for module, line in sorted(pcbvlm_imports(path).items())
        if stage_of(module) not in (None, stage)
    ]
    assert crossings == [], "stages must share code through shared modules (runs, model_folder, ...)"


def test_the_check_sees_imports_inside_functions(tmp_path):
    # The import checker itself: top-level, function-local and `from pcbvlm import x` forms.
    source = tmp_path / "stage.py"
    source.write_text(
        "from pcbvlm.runs import adapter_folder\n"
        "def f():\n"
        "    from pcbvlm.merge import MERGED_DIR\n"
        "    import pcbvlm.training\n"
        "from pcbvlm import quantize\n"
    )
    found = pcbvlm_imports(source)
    assert {m for m in found if stage_of(m)} == {"merge", "training", "quantize"}
    assert found["merge"] == 3
