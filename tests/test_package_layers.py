"""The package layers hold: each package imports only the ones below it
(`configuration` <- `hart` <- `pipelines` <- `trainer` <- `demo` <- `jobs` <- `benchmarks`), the model library imports no
Ray, MLflow or boto3 and applies torch.distributed in one module, and `hart.layers` (what model
families share) depends on no model family.

Run: .venv/bin/pytest tests/test_package_layers.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["configuration", "hart", "pipelines", "trainer", "demo", "jobs", "benchmarks"]
SERVICES = ("ray", "mlflow", "boto3", "botocore")


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", ORDER)
def test_a_package_imports_only_the_layers_below_it(package):
    above = ORDER[ORDER.index(package) + 1:]
    wrong = {f"{path.relative_to(REPO)} imports {name}"
             for path in files(package) for name in imports(path) if name.split(".")[0] in above}
    assert not wrong, sorted(wrong)


def test_the_model_library_is_plain_single_device_pytorch():
    wrong = set()
    for path in files("hart"):
        names = imports(path)
        wrong |= {f"{path.relative_to(REPO)} imports {n}" for n in names if n.split(".")[0] in SERVICES}
        if path.relative_to(REPO).as_posix() != "hart/training/parallelize.py":
            wrong |= {f"{path.relative_to(REPO)} imports {n}" for n in names if n.startswith("torch.distributed")}
        if ".cuda()" in path.read_text():
            wrong.add(f"{path.relative_to(REPO)} calls .cuda()")
    assert not wrong, sorted(wrong)


def test_configuration_needs_no_torch_and_shared_layers_no_model_family():
    wrong = {f"{p.relative_to(REPO)} imports {n}" for p in files("configuration") for n in imports(p)
             if n.split(".")[0] == "torch"}
    families = ("hart.tokenizer", "hart.transformer", "hart.training")
    wrong |= {f"{p.relative_to(REPO)} imports {n}" for p in files("hart/layers") for n in imports(p)
              if n.startswith(families)}
    assert not wrong, sorted(wrong)
