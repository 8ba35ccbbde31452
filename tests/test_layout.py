"""The package's layers: the pipeline imports no web framework, database or HTTP library, and imports point one
way (cli and web down to pipeline, storage and config; never back up)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cds_service"
FORBIDDEN_IN_PIPELINE = {"flask", "flask_cors", "werkzeug", "sqlalchemy", "requests", "urllib3", "gunicorn",
                         "granian", "psycopg"}
# What each layer may import from the package (besides itself and the shared modules).
SHARED = {"config", "errors", "safetext", "metrics"}  # metrics: the metric objects every layer counts on
MAY_IMPORT = {
    "pipeline": set(),
    "storage": set(),
    "auth": {"storage"},
    "report": {"storage", "pipeline"},
    "tools": {"auth"},  # the one list of JWT algorithms (auth/keysets.py)
    "serving": set(),
    "fhir": {"pipeline"},
    "web": {"pipeline", "storage", "auth", "fhir"},
    "cli": {"pipeline", "storage", "auth", "report", "tools", "serving", "web", "fhir"},
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, as dotted names (relative imports resolved in the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py") if len(parts) > 1 or parts[0] != "__init__.py" else "package"


def package_layers(names: set[str]) -> set[str]:
    """The package's modules and subpackages among imported names (`cds_service.create_app` is the root's)."""
    layers = {name.split(".")[1] for name in names if name.startswith("cds_service.") and len(name.split(".")) > 1}
    return {n for n in layers if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file()}


PIPELINE = sorted((PACKAGE / "pipeline").glob("*.py"))


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: p.name)
def test_the_pipeline_imports_no_web_database_or_http_library(path: Path) -> None:
    roots = {name.split(".")[0] for name in imports(path)}
    assert not roots & FORBIDDEN_IN_PIPELINE, f"{path.name} imports {sorted(roots & FORBIDDEN_IN_PIPELINE)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    own = layer(path)
    if own not in MAY_IMPORT:
        return  # the package root and the shared modules
    used = package_layers(imports(path)) - {own} - SHARED
    assert used <= MAY_IMPORT[own], f"{path.relative_to(PACKAGE)} ({own}) imports {sorted(used - MAY_IMPORT[own])}"


def test_the_check_sees_imports() -> None:
    assert "flask" in {n.split(".")[0] for n in imports(PACKAGE / "web" / "api.py")}
    assert "pipeline" in package_layers(imports(PACKAGE / "web" / "api.py"))
