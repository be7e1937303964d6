"""The one exception type for mistakes a user can make and fix.

A leaf module with no imports, so every subpackage may raise it without breaking the
import direction of DESIGN.md. The message is one sentence naming the bad value and
what would be valid; the CLI prints it without a traceback and exits non-zero.
"""


class UserError(ValueError):
    """A mistake in what the user asked for: a layout, a config value, a path, a data line."""
