"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""


class AutoqError(Exception):
    """A problem with the user's input (model, data, space, options) that they can fix."""
