"""Hydra command-line overrides as plain strings: the one place that parses `[+|~|++]key=value`."""


def override_key(override: str) -> str:
    """`scheduler.warmup_steps` for `scheduler.warmup_steps=10`, `+callbacks.x._target_=...` or `~logger`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    """The text after the first `=` ('' for a deletion like `~logger`)."""
    return override.split("=", 1)[1] if "=" in override else ""
