"""The rules of the data.* values, each defined once: preflight checks a config with them, and ProteinDataModule
checks its arguments with them when it is built directly (the benchmark, tests)."""

from collections.abc import Mapping
from typing import Any

from protein_mlm.data.packing import check_packing_options
from protein_mlm.data.streaming import check_streaming_options
from protein_mlm.errors import ConfigError
from protein_mlm.rules import ValueRule, check_value

DATA_RULES = (
    ValueRule(
        "data.max_length",
        (int,),
        lambda v: v >= 3,
        ">= 3 (room for <cls>, <eos> and a residue)",
        "data.max_length=1024",
    ),
    ValueRule("data.max_tokens", (int, None), lambda v: v >= 3, ">= data.max_length, or null", "data.max_tokens=4096"),
    ValueRule("data.batch_size", (int,), lambda v: v >= 1, ">= 1", "data.batch_size=16"),
    ValueRule("data.val_fraction", (float,), lambda v: 0 <= v < 1, "in [0, 1)", "data.val_fraction=0.03"),
    ValueRule("data.val_max_sequences", (int, None), lambda v: v >= 1, ">= 1 or null", "data.val_max_sequences=10000"),
    ValueRule("data.mask_prob", (float,), lambda v: 0 < v < 1, "in (0, 1)", "data.mask_prob=0.15"),
    ValueRule("data.num_workers", (int,), lambda v: v >= 0, ">= 0 or auto", "data.num_workers=2", auto=True),
    ValueRule("data.shuffle_buffer", (int,), lambda v: v >= 1, ">= 1", "data.shuffle_buffer=10000"),
    ValueRule(
        "data.tokens_per_update", (int, None), lambda v: v >= 1, ">= 1 or null", "data.tokens_per_update=2097152"
    ),
)


def check_data_options(data: Mapping[str, Any]) -> None:
    """Every data.* rule on `data` (the config's data node, or the DataModule's arguments); absent keys pass."""
    for rule in DATA_RULES:
        key = rule.key.removeprefix("data.")
        if key in data:
            check_value(rule, data[key])
    packing = data.get("packing", False)
    if packing not in (True, False, "auto"):
        raise ConfigError(f"data.packing={packing!r} must be true, false or auto; e.g. data.packing=auto")
    max_tokens, max_length, streaming = data.get("max_tokens"), data.get("max_length"), data.get("streaming", False)
    if max_tokens is not None and max_length is not None and max_tokens < max_length:
        raise ConfigError(
            f"data.max_tokens={max_tokens} is below data.max_length={max_length}, so a long sequence fits no batch; "
            "raise data.max_tokens or lower data.max_length"
        )
    if data.get("val_path") is None and not streaming and data.get("val_fraction") == 0:
        raise ConfigError(
            "data.val_fraction=0 leaves no validation set; use e.g. data.val_fraction=0.03 or pass data.val_path"
        )
    # `auto` picks packing only where its rules hold (plan.py)
    check_packing_options(packing is True, max_tokens, streaming, max_length)
    if streaming:
        check_streaming_options(
            data.get("val_path"), max_tokens, data.get("cluster_map"), data.get("tokens_per_update")
        )
