"""Hydra command-line overrides as plain strings: the one place that parses `[+|~|++]key=value`."""

import difflib
from typing import Any


def override_key(override: str) -> str:
    """`scheduler.warmup_steps` for `scheduler.warmup_steps=10`, `+callbacks.x._target_=...` or `~logger`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    """The text after the first `=` ('' for a deletion like `~logger`)."""
    return override.split("=", 1)[1] if "=" in override else ""


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a nested dict as `a.b.c`, groups included."""
    if not isinstance(node, dict):
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for name, value in node.items():
        keys += dotted_keys(value, f"{prefix}.{name}" if prefix else str(name))
    return keys


def nearest_key(key: str, config: dict) -> str | None:
    """The existing key most like a mistyped one (`scheduler.warmup_step` -> `scheduler.warmup_steps`), if any."""
    near = difflib.get_close_matches(key, dotted_keys(config), n=1, cutoff=0.6)
    return near[0] if near else None
