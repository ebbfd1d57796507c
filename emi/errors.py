"""Errors the command line maps to exit codes, and the exit codes themselves (one table for every entry point).

0   success
2   usage error: bad arguments, missing or malformed inputs, bad config (one line on stderr names the cause)
3   partial success: some inputs failed, the rest was done; the report says which and why. Also work stopped
    part-way for a reason outside the inputs (a full disk, an object store that stopped answering): what is
    complete is kept and a re-run continues
75  stopped before the end and NOT requeued (Slurm's requeue failed): resume with --resume latest
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NOT_FINISHED = 75  # EX_TEMPFAIL: the scheduler must not take the job for finished


class UsageError(Exception):
    """The invocation itself is wrong (missing folder, bad CSV header, bad config): exit code 2."""


class StoppedError(Exception):
    """The work stopped part-way for a reason outside the inputs (a full disk): what is complete is kept and a
    re-run continues from it. Exit code 3."""
