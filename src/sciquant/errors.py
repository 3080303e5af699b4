"""The one exception type for errors a user can cause and fix."""


class SciquantError(Exception):
    """A bad config, a missing or corrupt file, a failed download.

    The message names the file or config key and says what to do; the CLI prints it without a
    traceback and exits with status 2.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """`error` as one short line for a message: its type and the first line of its text (the
    type alone where the text is empty, as for an empty file's EOFError)."""
    text = str(error).strip()
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
