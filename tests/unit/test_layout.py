"""Dependencies between the top-level packages run one way (DESIGN.md): common <- judge, preferences, reward_model
<- stages (sft, ppo, dpo, eval) <- recipes. Checked on every import statement, the ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What each package may import besides itself. preferences may score with the RewardModel API (DESIGN: "score (gold
# scorers, reward model, judge)"), so reward_model must not import preferences.
ALLOWED = {
    "common": set(),
    "judge": {"common"},
    "reward_model": {"common"},
    "preferences": {"common", "judge", "reward_model"},
    **{stage: {"common", "judge", "preferences", "reward_model"} for stage in ("sft", "ppo", "dpo", "eval")},
    "recipes": {"common", "judge", "preferences", "reward_model", "sft", "ppo", "dpo", "eval"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", list(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    assert (ROOT / package / "__init__.py").is_file(), f"{package}/ is a package"
    wrong = {f"{path.relative_to(ROOT)} imports {other}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for other in imported_packages(path) - ALLOWED[package] - {package}}
    assert not wrong, sorted(wrong)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import json\n\ndef f():\n    from preferences.scorers import build_scorer\n")
    assert imported_packages(source) == {"preferences"}
