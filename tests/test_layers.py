"""The package layering of docs/DESIGN.md ("Module map"), read from the source with `ast`.

Every import points down: training -> evaluation -> models / dataloaders -> util; no circle anywhere; no
library module imports config.py, Sacred, demo/, experiments/, scripts/, tools/ or tests/ (the top of the
graph, beside the entry points); nothing outside tests/ imports a tests/ module; an import inside a function
says why; torchvision and matplotlib are imported only inside the functions that use them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"util": 0, "dataloaders": 1, "models": 1, "evaluation": 2, "training": 3}
FORBIDDEN_IN_LIBRARY = {"config", "sacred", "train", "test", "tests", "scripts", "tools", "demo",
                        "experiments", "phantom"}
TEST_MODULES = {path.stem for path in (ROOT / "tests").glob("*.py")}
TOP_FILES = sorted(path for folder in ("phantom", "demo", "experiments", "scripts", "tools") for path in
                   (ROOT / folder).glob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in one file, at any depth (`from a import b`: a, a.b)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, name) for name in (node.module, *(f"{node.module}.{a.name}"
                                                                     for a in node.names))]
    return found


def library_files() -> list[Path]:
    return sorted(path for package in LEVEL for path in (ROOT / package).glob("*.py"))


def test_nothing_outside_tests_imports_a_test_module():
    outside = [path for path in ROOT.glob("*.py")] + TOP_FILES + library_files()
    wrong = [f"{path.relative_to(ROOT)} line {line}: {module}" for path in outside
             for line, module in imported_modules(path) if module.split(".")[0] in TEST_MODULES | {"tests"}]
    assert not wrong, "; ".join(wrong)


def module_name(path: Path) -> str:
    """The dotted name a file is imported by: util/io.py -> util.io, demo/__init__.py -> demo, config.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle():
    """Module-level and inner imports between the repository's modules (library, entry points, demo/,
    experiments/, scripts/, tools/) form no circle (e.g. models.checkpoint <-> models.encoders once did,
    through a weights-only loader; demo.run <-> demo.__main__ through the thread pins)."""
    files = library_files() + TOP_FILES + sorted(ROOT.glob("*.py"))
    names = {module_name(path): path for path in files}
    graph = {name: sorted({module for _, module in imported_modules(path)} & set(names) - {name})
             for name, path in names.items()}
    done = set()

    def walk(name, stack):
        for target in graph[name]:
            assert target not in stack, "circle: " + " -> ".join(stack[stack.index(target):] + [target])
            if target not in done:
                walk(target, stack + [target])
        done.add(name)
    for name in graph:
        walk(name, [name])


def inner_imports(path: Path) -> list[int]:
    """Line numbers of the imports inside function bodies of one file."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines += [sub.lineno for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    return sorted(set(lines))


# imported only where used: torchvision loads torch._dynamo (~1.5-2 s of CPU per process), which test.py,
# scripts/segment_volume.py and any config error would pay without building a torchvision network
HEAVY_AT_USE = {"torchvision", "matplotlib"}


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_point_down_say_why_inside_functions_and_load_heavy_modules_where_used(path):
    package = path.parent.name
    wrong = []
    for line, module in imported_modules(path):
        top = module.split(".")[0]
        if top in FORBIDDEN_IN_LIBRARY or top in TEST_MODULES:
            wrong.append(f"line {line}: {module} (library code may not import it)")
        elif top in LEVEL and top != package and LEVEL[top] >= LEVEL[package]:
            wrong.append(f"line {line}: {module} (not below {package}/)")
    assert not wrong, f"{path.relative_to(ROOT)}: " + "; ".join(wrong)
    source = path.read_text().splitlines()
    silent = [line for line in inner_imports(path)
              if "#" not in source[line - 1] and not source[line - 2].strip().startswith("#")]
    assert not silent, (f"{path.relative_to(ROOT)}: imports inside functions at lines {silent} without a "
                        "comment saying why (a cycle, or a heavy optional dependency): move them to the top")
    inner = set(inner_imports(path))
    wrong = [f"line {line}: {module}" for line, module in imported_modules(path)
             if module.split(".")[0] in HEAVY_AT_USE and line not in inner]
    assert not wrong, (f"{path.relative_to(ROOT)}: a module-level import of a heavy dependency ("
                       + "; ".join(wrong) + "): import it inside the function that needs it, with a comment")


def test_only_conftest_edits_sys_path():
    """The repository is an installed package (`make setup`: pip install -e .): no other file edits it."""
    conftest = ROOT / "tests" / "conftest.py"
    sources = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p != conftest]
    editing = [str(p.relative_to(ROOT)) for p in sources
               if any(f"sys.path.{verb}" in p.read_text() for verb in ("insert", "append", "extend"))]
    assert not editing, f"sys.path edited in {editing}: import the installed packages instead"
