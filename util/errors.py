"""Errors the user can fix: entry points (util/cli.py, config.run_sacred) print the message alone."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: the message names the thing and the fix, in one line."""
