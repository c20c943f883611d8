"""The progress bar of the inference tools: drawn on a terminal, absent from logs (no blank line left behind)."""

from rich.console import Console
from rich.progress import Progress


def progress_bar() -> Progress:
    """A transient bar; disabled when stdout is not a terminal, where it would only leave an empty line."""
    console = Console()
    return Progress(console=console, transient=True, disable=not console.is_terminal)
