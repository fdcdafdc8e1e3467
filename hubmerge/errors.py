"""The one exception type that the CLI turns into a one-line error message."""


class HubmergeError(Exception):
    """A problem with the user's input or environment, reported as one line naming the culprit."""
