"""One error type for bad input, so the command line can print one clear line instead of a traceback."""


class CaiError(Exception):
    """Bad input or an unusable setting. The message names the file or field and says how to fix it."""
