"""Typed value rules: a config key, its types, its range and an example, checked with one message shape."""

from typing import Any, NamedTuple

from protein_mlm.errors import ConfigError


class ValueRule(NamedTuple):
    """One key's rule; the message of a bad value names the key, the value, the requirement and the example."""

    key: str  # the dotted config key, e.g. data.max_length
    types: tuple  # the types allowed (None: may be null; float admits an int)
    valid: Any  # value -> bool, the range
    requirement: str  # the range in words, e.g. ">= 1"
    example: str  # a valid override, e.g. data.batch_size=16
    auto: bool = False  # may also be `auto` (resolved by the run plan)


def _type_ok(value: Any, types: tuple) -> bool:
    if value is None:
        return None in types
    if list in types:  # a list (or an OmegaConf ListConfig) whose shape the rule's range checks
        return isinstance(value, list | tuple) or type(value).__name__ == "ListConfig"
    if isinstance(value, bool):
        return False
    return (float in types and isinstance(value, int | float)) or (int in types and isinstance(value, int))


def check_value(rule: ValueRule, value: Any) -> None:
    """Raise a one-line ConfigError when `value` breaks `rule`."""
    if rule.auto and value == "auto":
        return
    kind = " or ".join("null" if t is None else t.__name__ for t in rule.types)
    if not _type_ok(value, rule.types):
        article = "an" if kind[0] == "i" else "a"
        raise ConfigError(f"{rule.key}={value!r} is not {article} {kind}; e.g. {rule.example}")
    if value is not None and not rule.valid(value):
        raise ConfigError(f"{rule.key}={value} must be {rule.requirement}; e.g. {rule.example}")
