"""Names in the docs, docstrings and comments point at things that exist (no module or file left behind by a move).

Checked in every tracked text file: ``noiserefine.<module>[.<name>]`` resolves to a module of the package (and
``<name>`` is defined at its top level), ``python -m noiserefine.<module>`` is a runnable module; in the
Markdown files, the shipped configs and the docstrings and comments of the Python files, a repository path
(``noiserefine/...``, ``docs/...``, ``tests/...``, ...) exists. Read from the source without importing anything.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_DIRS = ("noiserefine", "tests", "docs", "bench", "configs", "infra", "pipeline", "trainer")
DOTTED = re.compile(r"(?<![\w./-])noiserefine(?:\.[A-Za-z_]\w*)+(?![\w/-])")  # not a schema "noiserefine.x/1"
RUN_MODULE = re.compile(r"python3? -m (noiserefine(?:\.\w+)*)")
REPO_PATH = re.compile(r"(?<![\w./~-])(?:%s)/[\w./{}*<>,-]*[\w}*>]" % "|".join(TOP_DIRS))
PLACEHOLDER = re.compile(r"[*<>{}$]")


def tracked(*suffixes: str) -> list[Path]:
    """Tracked files (a copy without git: those under the top directories), this one aside: its guard names
    stale references on purpose."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(REPO)) for top in TOP_DIRS for p in (REPO / top).rglob("*")]
        names += [p.name for p in REPO.iterdir()]
    return [REPO / name for name in names
            if name.endswith(suffixes) and (REPO / name).is_file() and REPO / name != Path(__file__).resolve()]


def module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dotted_resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        found = module_file(".".join(parts[:end]))
        if found is not None:
            return end == len(parts) or parts[end] in top_level_names(found)
    return False


def runnable(dotted: str) -> bool:
    found = module_file(dotted)
    if found is None:
        return False
    if found.name == "__init__.py":
        return (found.parent / "__main__.py").is_file()
    return "__main__" in found.read_text()


def stale_references(text: str, paths: bool) -> list[str]:
    """What ``text`` names that does not exist (``paths``: also check repository paths)."""
    stale = [m for m in DOTTED.findall(text) if not dotted_resolves(m)]
    stale += [f"python -m {m}" for m in RUN_MODULE.findall(text) if not runnable(m)]
    if paths:
        stale += [p for p in REPO_PATH.findall(text) if not PLACEHOLDER.search(p) and not (REPO / p).exists()]
    return stale


def prose_of(path: Path) -> str:
    """The docstrings and comments of a Python file (where paths are prose, not code such as a regex)."""
    source = path.read_text()
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    docs = [node.value.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    return "\n".join(comments + docs)


def test_the_checks_see_stale_references():
    """Guard: references that went stale in this repository are reported; live ones are not."""
    stale = ("python -m noiserefine.train_teacher --config configs/digits.yaml; see docs/paper_table.md and "
             "noiserefine.generate.shard_samples")
    assert stale_references(stale, paths=True) == ["noiserefine.train_teacher", "noiserefine.generate.shard_samples",
                                                   "python -m noiserefine.train_teacher", "docs/paper_table.md"]
    live = ("python -m noiserefine.digits.train_teacher, noiserefine.targets.generate.shard_samples, "
            "noiserefine/backends/registry.py, schema noiserefine.gpu_check/1, bench/results/*gpu_check.json, "
            "bench/results/2026-11-26-h200-gpu_check.{md,json}")
    assert stale_references(live, paths=True) == []
    assert prose_of(REPO / "tests" / "test_references.py").count("noiserefine/...") == 1  # this module's docstring


def test_module_names_in_every_text_file_exist():
    found = {str(p.relative_to(REPO)): stale_references(p.read_text(), paths=False)
             for p in tracked(".py", ".md", ".yaml", ".toml", "Makefile", ".sh")}
    assert not {k: v for k, v in found.items() if v}


def test_repository_paths_in_the_docs_configs_docstrings_and_comments_exist():
    texts = {p: p.read_text() for p in tracked(".md", ".yaml") if p.suffix == ".md" or p.parent.name == "configs"}
    texts.update({p: prose_of(p) for p in tracked(".py")})
    found = {str(p.relative_to(REPO)): stale_references(text, paths=True) for p, text in texts.items()}
    assert not {k: v for k, v in found.items() if v}
