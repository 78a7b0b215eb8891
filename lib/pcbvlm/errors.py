"""Errors a user can act on, and the exit code each one maps to.

Jobs catch `UserError` at the top (see `pcbvlm.cli.run_job`), print its one-line message and exit
with its code, so that bad input never ends in a traceback.
"""

from __future__ import annotations

# Exit codes shared by every job (the README lists them).
EXIT_OK = 0
EXIT_FAILED = 1  # a check failed (preflight) or a stage could not finish
EXIT_BAD_INPUT = 2  # bad config, bad data, bad arguments
EXIT_DISK_GUARD = 3  # training saved and stopped because the checkpoint volume ran low
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM (training saves a checkpoint first), as shells report Ctrl-C


class UserError(Exception):
    """An error caused by input the user controls; `str(err)` is the whole message."""

    exit_code = EXIT_FAILED


class ConfigError(UserError):
    exit_code = EXIT_BAD_INPUT


class DataError(UserError):
    exit_code = EXIT_BAD_INPUT


class DiskGuardStop(UserError):
    exit_code = EXIT_DISK_GUARD


class Interrupted(UserError):
    exit_code = EXIT_INTERRUPTED
