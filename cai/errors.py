"""One error type for bad input, so the command line can print one clear line instead of a traceback."""

from collections.abc import Iterable


class CaiError(Exception):
    """Bad input or an unusable setting. The message names the file or field and says how to fix it."""


def check_choice(field: str, value: str, choices: Iterable[str]) -> None:
    """One clear line for a config field set to something it does not take."""
    if value not in choices:
        raise CaiError(f"{field}: choose {', '.join(choices)}, got '{value}'")
