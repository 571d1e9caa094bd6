"""The package's import layering (../shared/DESIGN.md), enforced by reading every module's AST.

Data flows one way: a module imports only from its own layer or the layers to its left;
``estimators``, ``optim`` and ``rl`` do not import each other; nothing imports ``testing``.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gradnoise"

# layer rank of each subpackage / top-level module; a module may import ranks <= its own
RANKS = {
    "errors": 0,
    "layers": 1,
    "workloads": 1,
    "perturbation": 1,
    "stats": 2,
    "estimators": 3,
    "optim": 3,
    "rl": 3,
    "evaluation": 3,
    "data": 3,
    "sampled": 3,
    "control": 4,
    "monitor": 5,
    "cli": 6,
    "__init__": 7,
    "__main__": 7,
}
SIBLINGS = {"estimators", "optim", "rl"}


def _part_of(module_path: Path) -> str:
    relative = module_path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_parts(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "gradnoise" and len(parts) > 1:
                yield node.lineno, parts[1]


def _violations():
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part_of(path)
        if part == "testing":
            continue
        for lineno, target in _imported_parts(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE)}:{lineno} imports gradnoise.{target}"
            if target == "testing":
                yield f"{where} (nothing in the package may import testing)"
            elif target not in RANKS or part not in RANKS:
                yield f"{where} (unknown part: add it to RANKS in this test)"
            elif RANKS[target] > RANKS[part]:
                yield f"{where} (imports a layer to its right)"
            elif target in SIBLINGS and part in SIBLINGS and target != part:
                yield f"{where} (estimators, optim and rl must not import each other)"


def test_imports_follow_the_layering():
    assert list(_violations()) == []


def test_the_check_sees_imports():
    tree = ast.parse("from gradnoise.stats import GradStats\nimport gradnoise.layers.linear\n")
    assert [part for _, part in _imported_parts(tree)] == ["stats", "layers"]
