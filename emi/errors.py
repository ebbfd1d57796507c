"""Errors the command line maps to exit codes."""


class UsageError(Exception):
    """The invocation itself is wrong (missing folder, bad CSV header, bad config): exit code 2."""


class StoppedError(Exception):
    """The work stopped part-way for a reason outside the inputs (a full disk): what is complete is kept and a
    re-run continues from it. Exit code 3."""
