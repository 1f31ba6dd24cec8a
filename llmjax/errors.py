"""The library's one error type, on the ground floor so that every module can raise it without importing a
module above it."""


class LlmjaxError(ValueError):
    """A problem the user can fix, told in one line that names it and the fix (a config key, an input, a locked
    workdir, a full disk): the CLIs print it without a traceback and exit with status 2."""
