"""Run a Sacred experiment from the command line with one-line error messages.

Sacred's own `run_commandline` prints a traceback for any exception. Our entry points call
`run_sacred(ex)` instead: the same command line (`python train.py with demo fold=2`), but a
`UserError` or a Sacred configuration error (unknown key, bad value) ends as `error: ...` on one
line with exit code 2. `--debug` keeps Sacred's behaviour (full traceback).
"""
from __future__ import annotations

import sys

from docopt import docopt
from sacred.arg_parser import get_config_updates
from sacred.utils import SacredError, ensure_wellformed_argv

from util.errors import UserError, exit_with_message


def run_sacred(ex, argv: list[str] | None = None):
    """Parse `argv` as Sacred does and run the experiment's main command; returns the Run."""
    argv = ensure_wellformed_argv(sys.argv if argv is None else argv)
    short_usage, usage, internal_usage = ex.get_usage()
    args = docopt(internal_usage, [str(a) for a in argv[1:]], default_help=False)
    if args["help"] or args["--help"]:
        print(usage)
        sys.exit(0)
    command = args.get("COMMAND") or ex.default_command
    if command not in ex.commands:
        exit_with_message(f"unknown command '{command}': use one of {', '.join(ex.commands)}")
    config_updates, named_configs = get_config_updates(args["UPDATE"])
    try:
        return ex.run(command, config_updates, named_configs, info={}, meta_info={}, options=args)
    except UserError as error:
        if args.get("--debug"):
            raise
        exit_with_message(str(error))
    except SacredError as error:
        if args.get("--debug"):
            raise
        exit_with_message(f"{type(error).__name__}: {error} (check the key against config.py)")
    except KeyboardInterrupt:
        exit_with_message("interrupted by the user", 130)
