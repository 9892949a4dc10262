"""The documentation as a map: the README stays short, every relative link in the Markdown files
resolves, each package README lists exactly the package's modules, and no comment or document
cites a design document the repository does not hold.

Design: plain file reads, no network. Links are checked for the file (or folder) they name; a
`#fragment` is not checked. A package map is the first fenced block of `PACKAGE/README.md`: one
entry per line, two spaces of indent per folder level, a `#` comment after the name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("configuration", "hart", "pipelines", "trainer", "demo", "jobs", "benchmarks")
README_LIMIT = 12 * 1024
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in out if (REPO / name).exists()]


def test_readme_is_a_short_map():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; depth belongs in docs/ (limit {README_LIMIT})"


def test_every_relative_link_in_the_markdown_files_resolves():
    broken = []
    for path in markdown_files():
        for target in LINK.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


def listed_modules(package: str) -> set[str]:
    text = (REPO / package / "README.md").read_text()
    block = text.split("```\n")[1]
    paths, stack = set(), []
    for line in block.splitlines():
        name = line.split("#")[0].rstrip()
        if not name.strip():
            continue
        depth = (len(name) - len(name.lstrip())) // 2
        stack = stack[:depth] + [name.strip()]
        paths.add("".join(stack))
    return {p for p in paths if p.endswith(".py")}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_readme_lists_its_modules(package):
    modules = {str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py") if p.name != "__init__.py"}
    listed = listed_modules(package)
    assert not modules - listed, f"{package}/README.md lacks {sorted(modules - listed)}"
    assert not listed - modules, f"{package}/README.md lists missing files {sorted(listed - modules)}"


def test_no_citation_of_documents_outside_the_repository():
    names = ["HART" + "_SPEC", "RAY" + "_NOTES", "MLFLOW" + "_NOTES"]
    found = subprocess.run(["git", "grep", "-n", "-e", names[0], "-e", names[1], "-e", names[2]], cwd=REPO,
                           capture_output=True, text=True).stdout
    assert found == "", found
