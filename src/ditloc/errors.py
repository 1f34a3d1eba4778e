"""User-facing errors: one line that says what is wrong and what to do."""


class DitlocError(ValueError):
    """Bad input or an unsupported setup; the message is meant for the user as is."""


class Interrupted(DitlocError):
    """Ctrl-C during a resumable job, after its progress was saved; the message says how to resume."""
