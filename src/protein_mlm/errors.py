"""Errors caused by the user's input: reported as one line, without a traceback."""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(UserError):
    """An invalid configuration value."""


class DataError(UserError):
    """An unreadable or invalid data file."""
