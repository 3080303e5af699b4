"""The one exception type for errors a user can cause and fix."""


class SciquantError(Exception):
    """A bad config, a missing or corrupt file, a failed download.

    The message names the file or config key and says what to do; the CLI prints it without a
    traceback and exits with status 2.
    """
