"""User-facing errors: one line that says what is wrong and what to do."""


class DitlocError(ValueError):
    """Bad input or an unsupported setup; the message is meant for the user as is."""
