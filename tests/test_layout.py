"""The house rules that a grep can check: no import cycle among the toolchain's modules, the runtime
never reaches into the toolchain or torch, and each shared idea is defined in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(pkg_root: Path, pkg: str) -> dict[str, Path]:
    out = {}
    for f in (pkg_root / pkg).rglob("*.py"):
        rel = f.relative_to(pkg_root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _top_level_imports(name: str, f: Path, known: set[str]) -> set[str]:
    """Modules of the package this one imports at import time (not inside functions)."""
    tree = ast.parse(f.read_text())
    is_pkg = f.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_in_the_toolchain():
    mods = _modules(ROOT, "emma_export")
    graph = {}
    for name, f in mods.items():
        deps = _top_level_imports(name, f, set(mods))
        # a package importing its own submodules to register them is the package's job, not a cycle
        graph[name] = {d for d in deps if not (f.name == "__init__.py" and d.startswith(name + "."))}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_runtime_imports_neither_torch_nor_the_toolchain():
    for f in (ROOT / "runtime" / "emma_runtime").rglob("*.py"):
        text = f.read_text()
        bad = re.findall(r"^\s*(?:import|from)\s+(torch|emma_export)\b", text, re.M)
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_one_home_for_shared_ideas():
    """Each of these is defined once: a second definition is a copy that will drift."""
    defs: dict[str, list[str]] = {}
    for f in list((ROOT / "emma_export").rglob("*.py")) + list((ROOT / "runtime" / "emma_runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append(str(f.relative_to(ROOT)))
            elif isinstance(node, ast.Assign) and isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.isupper():
                        defs.setdefault(t.id, []).append(str(f.relative_to(ROOT)))
    for name in ("_fail", "fail", "_gib", "gib", "PRECISIONS", "QUANTIZED", "TOLERANCE", "MIN_COMPUTE_CAPABILITY",
                 "text_ids", "check_out", "replace_dir", "confined", "RequestError", "BundleError", "psnr"):
        assert len(defs.get(name, [])) <= 1, f"{name} is defined in {defs[name]}"
    for name in ("Precision", "Limits", "BuildRequest", "WeightSource"):
        assert len(defs.get(name, [])) == 1, f"{name}: {defs.get(name)}"


def test_component_names_come_from_the_registry():
    """Outside the registry, no module spells an expert's name: the number of experts is a config field."""
    for f in list((ROOT / "emma_export").rglob("*.py")) + list((ROOT / "runtime" / "emma_runtime").rglob("*.py")):
        if f.name == "names.py":
            continue
        assert not re.search(r"[\"']und_expert_\d", f.read_text()), f"{f.relative_to(ROOT)} hard-codes an expert name"


def test_the_toolchain_imports_no_world():
    """A world (shapes_world) plugs in through entry points; the toolchain names none."""
    for f in (ROOT / "emma_export").rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"^\s*(?:import|from)\s+shapes_world\b", text, re.M), f"{f.relative_to(ROOT)} imports shapes_world"
        assert not re.search(r"""(?:name|config_name|cfg_name)\s*==\s*["']shapes["']""", text), f"{f.relative_to(ROOT)} switches on the shapes config name"
