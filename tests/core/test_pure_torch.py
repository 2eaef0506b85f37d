"""lightning_sam.core imports no Lightning: every module it (transitively) imports from the package is checked."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_sam"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _file_of(module: str) -> Path:
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_the_core_imports_no_lightning():
    files = sorted((PACKAGE / "core").glob("*.py"))
    assert len(files) >= 6  # __init__, update, backup, layout, groups, tensors
    seen, todo = set(), list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in ("lightning", "pytorch_lightning"), f"{path.relative_to(PACKAGE)} imports {name}"
            if top == "lightning_sam":
                todo.append(_file_of(name))
    # what the core reaches inside the package: itself, the method interface and the private compat layer
    reached = {p.relative_to(PACKAGE).parts[0] for p in seen}
    assert reached <= {"core", "methods", "_compat.py"}, reached
