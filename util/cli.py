"""Command-line runner of the argparse entry points (scripts/): one-line errors (a failed write too),
`--debug` tracebacks; `warn` prints one `warning: ...` line. Sacred entry points use `config.run_sacred`.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

from util.errors import UserError
from util.io import output_error_message


def exit_with_message(message: str, code: int = 2) -> None:
    """Print `error: <message>` as one line on stderr and exit with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def warn(message: str) -> None:
    """Print `warning: <message>` as one line on stderr (the run goes on)."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def restore_interrupt() -> None:
    """Ctrl-C raises KeyboardInterrupt again once the command starts (util/interrupt.py: imports)."""
    if signal.getsignal(signal.SIGINT) is getattr(sys.modules.get("util.interrupt"), "on_interrupt", None):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run an argparse-style `main(argv)`; `UserError` becomes a one-line message and exit 2 (`--debug`
    anywhere in argv: the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    restore_interrupt()
    try:
        code = main(argv)
    except UserError as error:
        if debug:
            raise
        exit_with_message(str(error))
    except OSError as error:
        message = output_error_message(error)
        if debug or message is None:
            raise
        exit_with_message(message)
    except KeyboardInterrupt:
        exit_with_message("interrupted by the user", 130)
    sys.exit(code or 0)
