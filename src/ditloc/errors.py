"""User-facing errors: one line that says what is wrong and what to do.

Every error ditloc raises for its user is a `DitlocError` (a `ValueError`); the kinds a caller
may want to tell apart have their own class. The CLI prints the message and exits 2.
"""


class DitlocError(ValueError):
    """Bad input or an unsupported setup; the message is meant for the user as is."""


class ConceptNotFound(DitlocError):
    """The concept is not in a prompt (or maps to no text token of it)."""


class UnsupportedModel(DitlocError):
    """A pipeline of no family ditloc serves, or a model that cannot serve what was asked."""


class BadOption(DitlocError):
    """An option with a value ditloc does not take (a flag, a family setting, a pipeline argument)."""


class Interrupted(DitlocError):
    """Ctrl-C during a resumable job, after its progress was saved; the message says how to resume."""
