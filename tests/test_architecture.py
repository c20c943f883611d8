"""The architecture's rules that code review alone would let slip: layers, single definitions, true docs."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, ROOT

PACKAGE = ROOT / "src" / "protein_mlm"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Floors, lowest first: a module imports only from its own floor or below. Top-level modules are the entry edge,
# except the shared error types, override parsing, value rules and the ESM alphabet, which every floor may use.
FLOORS = {"errors": 0, "overrides": 0, "rules": 0, "alphabet": 0}
FLOORS |= {"data": 1, "model": 2, "reporting": 3, "training": 4, "inference": 5}
EDGE = 6

# pattern -> the one file allowed to hold it
SINGLE_DEFINITIONS = {
    r"digest_size=16": "fasta.py",  # the sequence digest: the split, streaming and cluster rows must agree
    r"lstrip\(\"\+~\"\)": "overrides.py",  # parsing an override's key
    r"\\x1f\\x8b": "fasta.py",  # gzip detection
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    """protein_mlm.<first>...: the floor of its subpackage, or the edge for a top-level module."""
    first = module.split(".")[1] if "." in module else ""
    return FLOORS.get(first, EDGE)


def internal_imports(path: Path) -> set[str]:
    """The protein_mlm modules a source file imports (names imported from a package count as its modules)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("protein_mlm"):
            assert node.level == 0, f"{path}: relative import; use protein_mlm.<package>.<module>"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("protein_mlm")}
    return found


GRAPH = {module_name(p): internal_imports(p) for p in SOURCES}


def test_imports_never_run_up_a_floor():
    upward = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        for target in targets
        if target != "protein_mlm" and floor(target) > floor(source)
    ]
    assert not upward


# Imports the floors would allow but the design rules out: (package, package it must not import, why).
FORBIDDEN = [
    ("model", "protein_mlm.data", "the network is below the data pipeline: the alphabet is floor 0's alphabet.py"),
    ("inference", "protein_mlm.training", "inference reads checkpoint formats (model/checkpoints.py), not the trainer"),
]


@pytest.mark.parametrize(("package", "forbidden", "why"), FORBIDDEN, ids=[f"{p} !-> {f}" for p, f, _ in FORBIDDEN])
def test_packages_skip_what_they_must_not_know(package, forbidden, why):
    wrong = [
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        if source.startswith(f"protein_mlm.{package}")
        for target in targets
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert not wrong, f"{why}: {wrong}"


def test_the_module_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join([*path, module])
        state[module] = "open"
        for target in GRAPH.get(module, ()):
            visit(target, [*path, module])
        state[module] = "done"

    for module in GRAPH:
        visit(module, [])


def test_architecture_doc_names_every_package_and_only_those():
    """docs/architecture.md's tree (the block under `src/protein_mlm/`) matches the folders both ways."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc.split("src/protein_mlm/\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"^\s+([a-z_]+(?:/[a-z_]+)*)/\s", tree, flags=re.M))
    existing = {str(p.parent.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    existing |= {"assets"}
    assert named == existing, f"docs only: {named - existing}; folders only: {existing - named}"


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_target_in_the_configs_resolves(config):
    targets = re.findall(r"_target_:\s*([\w.]+)", config.read_text())
    targets += [t for t in re.findall(r"\b(protein_mlm(?:\.\w+)+)", config.read_text()) if t not in targets]
    for target in targets:
        module, _, name = target.rpartition(".")
        if target.startswith("protein_mlm.configs"):
            continue
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"{config.name}: {target} does not resolve ({e})")
    OmegaConf.load(config)


def test_each_shared_rule_has_one_definition():
    for pattern, home in SINGLE_DEFINITIONS.items():
        holders = [p.name for p in SOURCES if re.search(pattern, p.read_text())]
        assert holders == [home], f"{pattern} is defined in {holders}, expected only in {home}"


def test_no_module_is_an_outlier_in_size():
    """Modules are sized by concept; past 400 lines one holds two concepts (most are 50-250)."""
    long = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}
    assert not long


# Lightning's internals: only training/lightning_seams.py touches them (one named function per seam, each tested in
# tests/test_lightning_seams.py). Attribute chains through these reach Lightning's trainer or its internal loops.
SEAMS = PACKAGE / "training" / "lightning_seams.py"
LIGHTNING_CHAIN = {"trainer", "fit_loop", "epoch_loop", "batch_progress"}
LIGHTNING_LOOPS = {"fit_loop", "epoch_loop", "batch_progress"}  # internal loop objects, public names or not


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def chain(node: ast.expr) -> list[str]:
    """The names along `a.b.c` (for `a.b.c._d`, node `a.b.c`): ["a", "b", "c"]; calls and subscripts end it."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def lightning_privates(cls: type) -> set[str]:
    """The `_`-prefixed names a class inherits from Lightning: its methods and class attributes, and the instance
    attributes Lightning's own code assigns (`self._x = ...`)."""
    found = set()
    for base in cls.__mro__:
        if not base.__module__.startswith(("pytorch_lightning", "lightning")):
            continue
        found |= {name for name in vars(base) if is_private(name)}
        try:
            found |= set(re.findall(r"self\.(_\w+)\s*(?::[^=]+)?=", inspect.getsource(base)))
        except (OSError, TypeError):
            pass
    return {name for name in found if is_private(name)}


def lightning_internals(path: Path) -> list[str]:
    """Uses of Lightning's internals in a source file: `_`-prefixed attributes reached from a trainer or its loops,
    anything reached through the internal loops, a Lightning class's privates used or overridden in a subclass,
    and the checkpoint's `"loops"` key."""
    tree = ast.parse(path.read_text())
    module = importlib.import_module(module_name(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names = chain(node.value)
            through_trainer = bool(LIGHTNING_CHAIN & set(names))
            if (is_private(node.attr) and through_trainer) or (LIGHTNING_LOOPS & set(names)):
                found.append(f"{path.name}:{node.lineno} {'.'.join([*names, node.attr])}")
        elif isinstance(node, ast.Constant) and node.value == "loops":
            found.append(f'{path.name}:{node.lineno} "loops"')
        elif isinstance(node, ast.ClassDef) and isinstance(cls := getattr(module, node.name, None), type):
            privates = lightning_privates(cls)
            for inner in ast.walk(node):
                name = None
                if isinstance(inner, ast.FunctionDef):
                    name = inner.name
                elif isinstance(inner, ast.Attribute) and chain(inner.value) == ["self"]:
                    name = inner.attr
                if name in privates:
                    found.append(f"{path.name}:{inner.lineno} {node.name}.{name} (Lightning's)")
    return [use for use in found if not any(other.startswith(use + ".") for other in found)]  # outermost only


def test_lightning_internals_only_in_the_seams_module():
    """A Lightning upgrade can break only training/lightning_seams.py, whose tests name the broken guarantee."""
    found = [use for path in SOURCES if path != SEAMS for use in lightning_internals(path)]
    assert not found, f"use Lightning's public API, or a named seam in training/lightning_seams.py: {found}"
