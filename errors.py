"""The one exception type for user mistakes.

Bad configuration, bad data and bad checkpoints raise ``UserError`` (or a subclass). The CLI turns it
into a single line on stderr and exit code 2; programming errors keep their tracebacks.
"""


class UserError(Exception):
    """A mistake the user can fix: the message names the key, file or value to change."""
