"""Errors the command line maps to exit codes."""


class UsageError(Exception):
    """The invocation itself is wrong (missing folder, bad CSV header, bad config): exit code 2."""
