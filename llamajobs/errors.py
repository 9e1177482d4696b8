"""The two kinds of error the CLI tells apart: bad input (exit 2) and a failed operation (exit 1)."""


class SpecError(ValueError):
    """Bad user input: the message names the setting and what is allowed."""


class Failure(RuntimeError):
    """An operation failed: the cluster refused, a job is unknown to the cluster, a job crashed."""
