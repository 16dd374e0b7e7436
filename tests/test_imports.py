"""The module graph stays clean: no module imports another module's private (`_name`) names, the
imports between the project's modules form no cycle (lazy imports inside functions included;
`if TYPE_CHECKING:` blocks excluded), and every module imports, a fresh interpreter per package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("toprovar", "calibrate", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for file in sorted((REPO / package).rglob("*.py")):
            parts = list(file.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module that `name` (a module or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import statement outside TYPE_CHECKING."""
    tree = ast.parse(MODULES[module].read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for sub in node.body
        for n in ast.walk(sub)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, alias.name) for alias in node.names]
    return out


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        for base, name in _imports(module):
            target = _owner(f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base)
            if target and target != module:
                edges.setdefault(module, set()).add(target)
    return edges


def test_no_private_imports_across_modules() -> None:
    private = [
        f"{module}: from {base} import {name}"
        for module in MODULES
        for base, name in _imports(module)
        if name and name.startswith("_") and not name.startswith("__") and _owner(base) not in (None, module)
    ]
    assert private == []


def _cycle_members(edges: dict[str, set[str]]) -> list[str]:
    """The nodes on or behind a cycle: what is left after repeatedly removing nodes with no remaining edges."""
    remaining = set(edges) | {t for targets in edges.values() for t in targets}
    while True:
        leaves = {m for m in remaining if not edges.get(m, set()) & remaining}
        if not leaves:
            return sorted(remaining)
        remaining -= leaves


def test_no_import_cycles() -> None:
    edges = _edges()
    members = _cycle_members(edges)
    assert members == [], {m: sorted(edges.get(m, set()) & set(members)) for m in members}


def test_the_checks_see_imports_and_cycles() -> None:
    """The analysis is not vacuous: known edges are found, and a cycle would be reported."""
    edges = _edges()
    assert "toprovar.cli" in edges["toprovar.__main__"] and "toprovar.pruning" in edges["toprovar.pipeline"]
    assert "toprovar.models.registry" in edges["calibrate.inputs"] and "toprovar.metrics" in edges["benchmarks.latency"]
    assert _cycle_members({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == ["a", "b", "c", "d"]
    assert _cycle_members({"a": {"b"}, "b": {"c"}, "d": {"a"}}) == []


def test_every_module_imports() -> None:
    """A fresh interpreter per package imports each of its modules (`__main__` modules too; not run)."""
    for package in PACKAGES:
        names = [m for m in MODULES if m == package or m.startswith(package + ".")]
        code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
        proc = subprocess.run(
            [sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("entry", ["calibrate.__main__", "toprovar.__main__"])
def test_command_lines_set_openmp_spin_wait_before_torch_loads(entry):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: the command lines import
    toprovar.openmp first (sys.modules keeps import order); a value the user set is kept."""
    code = (
        f"import sys, os; import {entry}; import torch; names = list(sys.modules); "
        "print(names.index('toprovar.openmp') < names.index('torch'), os.environ['GOMP_SPINCOUNT'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "1000"]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "GOMP_SPINCOUNT": "77"}, check=True
    )
    assert out.stdout.split() == ["True", "77"]


def _project_top_level_names() -> list[str]:
    """Every import name this checkout puts on `sys.path` from its root: the packages (a folder with
    `__init__.py`) and the modules at the top level."""
    folders = [d.name for d in REPO.iterdir() if (d / "__init__.py").is_file()]
    modules = [f.stem for f in REPO.glob("*.py")]
    return sorted(folders + modules)


def test_no_top_level_name_is_another_distributions():
    """A top-level import name that another installed distribution also provides shadows it (or is
    overwritten by it): our old `kernels` package hid Hugging Face's `kernels`, which transformers needs.
    `packages_distributions()` maps every installed top-level name to the distributions that ship it."""
    import importlib.metadata

    names = _project_top_level_names()
    assert {"toprovar", "calibrate"} <= set(names)  # the check sees the project's packages
    owners = importlib.metadata.packages_distributions()
    clashes = {n: sorted(set(owners[n]) - {"toprovar"}) for n in names if set(owners.get(n, ())) - {"toprovar"}}
    assert clashes == {}, f"top-level names also provided by other distributions: {clashes}"


def test_transformers_t5_imports_beside_the_kernels():
    """From the checkout (where a top-level `kernels` folder used to shadow Hugging Face's), one
    interpreter imports transformers' T5 encoder and our attention kernels, and both work."""
    code = (
        "import torch\n"
        "from transformers import T5Config, T5EncoderModel\n"
        "from toprovar.kernels import flash_attn_entropy\n"
        "m = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=16))\n"
        "h = m(input_ids=torch.tensor([[3, 4, 1]])).last_hidden_state\n"
        "q = torch.randn(1, 2, 3, 4)\n"
        "out, ent = flash_attn_entropy(q, q, q)\n"
        "print(tuple(h.shape), tuple(out.shape), tuple(ent.shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "(1, 3, 8) (1, 2, 3, 4) (1, 2, 3)"
