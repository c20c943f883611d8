"""The architecture's rules that code review alone would let slip: layers, single definitions, true docs."""

import ast
import importlib
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
