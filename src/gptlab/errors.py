"""The one error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class GptlabError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
