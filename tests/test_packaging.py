"""What the suite imports, the project's own files install.

A test that imports a package installed by hand on the development machine
passes there and fails on a fresh one (psutil did: only the bench extra had
it). Here every module imported anywhere in the package, the scripts and the
tests (inside functions too) must be the standard library's, the project's
own, or come from a distribution named in requirements.txt or the `test`
extra of setup.py.
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Dict, List, Set

from conftest import REPO


def requirement_name(line: str) -> str:
    """`torch>=2.5` -> `torch`, normalised as pip compares names (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise ValueError(f"not a requirement: {line!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def install_requires() -> Set[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return {requirement_name(line) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def extras_require() -> Dict[str, List[str]]:
    """setup.py's `extras_require`, read as a literal (running setup.py would build the C library)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "extras_require":
                    return ast.literal_eval(keyword.value)
    raise AssertionError("setup.py's setup() call has no literal extras_require")


def imported_modules(paths) -> Dict[str, Set[str]]:
    """{top-level module: files importing it}, absolute imports anywhere in `paths`."""
    found: Dict[str, Set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def own_modules() -> Set[str]:
    """The project's package, scripts, test helpers and benchmark modules (tests import bench.py)."""
    files = [*REPO.glob("*.py"), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]
    return {"llama"} | {path.stem for path in files}


def test_requirement_names_are_read_as_pip_reads_them():
    assert requirement_name("torch>=2.5") == "torch"
    assert requirement_name("Typing_Extensions ; python_version<'3.10'") == "typing-extensions"
    assert "pytest" in {requirement_name(r) for r in extras_require()["test"]}


def test_every_module_the_suite_imports_is_installed_by_the_project():
    sources = [*REPO.glob("llama/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("example_*.py"), REPO / "chat.py"]
    declared = install_requires() | {requirement_name(r) for r in extras_require()["test"]}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(imported_modules(sources).items()):
        if module in sys.stdlib_module_names or module in own_modules():
            continue
        distributions = {requirement_name(d) for d in providers.get(module, [])}
        if not distributions & declared:
            where = ", ".join(sorted(files)[:3])
            provided = f"provided by {', '.join(sorted(distributions))}" if distributions else "not installed here"
            missing.append(f"{module} ({provided}; imported in {where})")
    assert not missing, (
        "imported but in neither requirements.txt nor setup.py's test extra, so a fresh "
        "`pip install -e \".[test]\"` lacks it: " + "; ".join(missing)
    )


def test_skip_reasons_name_the_variable_to_set_not_a_path_of_the_development_machine():
    # A user's clone has no ../shared: a reason must say how to provide the file (an environment
    # variable), not where it lay on the machine the test was written on.
    reasons = []
    for path in REPO.glob("tests/*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            texts = [kw.value for kw in node.keywords if kw.arg == "reason"]
            if getattr(node.func, "attr", None) == "skip":
                texts += node.args[:1]
            for text in texts:
                for part in ast.walk(text):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        reasons.append((path.name, part.value))
    assert reasons
    bad = [(name, reason) for name, reason in reasons if "../" in reason or "shared/" in reason or "/work" in reason]
    assert not bad, bad
