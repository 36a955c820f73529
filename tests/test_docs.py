"""The documentation a newcomer reads first: the API page is generated from
the docstrings (never stale, never cut short), code snippets import what they
use, and nothing cites a file that is not in the repository."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Names a snippet may only use after importing them.
MODULE_NAMES = {"torch", "pk", "posttrain_kernels", "nn", "F", "peft", "transformers", "math", "np"}


def test_api_page_is_generated_from_the_docstrings():
    from posttrain_kernels.bench.api_doc import render
    assert (ROOT / "docs" / "api.md").read_text() == render(), \
        "docs/api.md is stale: python -m posttrain_kernels.bench.api_doc > docs/api.md"


def _snippets():
    for path in DOCS:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(block, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_snippets()))
def test_snippets_parse_and_import_what_they_use(code):
    tree = ast.parse(code)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {a.asname or a.name for a in node.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    missing = (used & MODULE_NAMES) - imported
    assert not missing, f"snippet uses {sorted(missing)} without importing it"


def test_nothing_cites_files_outside_the_repository():
    brief = "DESIGN" + ".md"  # the design brief the project started from lives outside the repository
    files = DOCS + [p for p in ROOT.rglob("*.py") if ".git" not in p.parts]
    for path in files:
        assert brief not in path.read_text(), f"{path.relative_to(ROOT)} cites {brief}, which is not in the repository"
    for path in DOCS:  # every repository path a doc names in backquotes exists
        text = path.read_text()
        for ref in re.findall(r"`((?:docs|ops|kernels|autotune|bench|tests)/[\w/.<>-]+\.(?:py|md|sh))", text):
            if "<" not in ref:
                assert (ROOT / ref).exists(), f"{path.name} names {ref}, which does not exist"
