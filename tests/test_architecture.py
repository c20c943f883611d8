"""The architecture's rules that code review alone would let slip: single definitions and small modules."""

import re

from tests.conftest import ROOT

SOURCES = sorted((ROOT / "src" / "protein_mlm").rglob("*.py"))

# pattern -> the one file allowed to hold it
SINGLE_DEFINITIONS = {
    r"digest_size=16": "fasta.py",  # the sequence digest: the split, streaming and cluster rows must agree
    r"lstrip\(\"\+~\"\)": "overrides.py",  # parsing an override's key
    r"\\x1f\\x8b": "fasta.py",  # gzip detection
}


def test_each_shared_rule_has_one_definition():
    for pattern, home in SINGLE_DEFINITIONS.items():
        holders = [p.name for p in SOURCES if re.search(pattern, p.read_text())]
        assert holders == [home], f"{pattern} is defined in {holders}, expected only in {home}"


def test_no_module_is_over_300_lines():
    long = {p.name: n for p in SOURCES if (n := len(p.read_text().splitlines())) > 300}
    assert not long
