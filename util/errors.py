"""Errors the user can fix, and how entry points report them.

Library code raises `UserError` with one sentence that names the offending thing and the fix.
Entry points catch it (util/cli.py, config.run_sacred) and print that sentence alone (no traceback)
unless `--debug` is given.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: the message names the thing and the fix, in one line."""
