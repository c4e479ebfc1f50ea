"""Imported first by every entry point: a Ctrl-C before the command starts (during the start-up imports
of torch, Sacred, ...) prints one line and exits 130. util/cli.run_cli and config.run_sacred restore
Python's own handler (KeyboardInterrupt), so that a run stopped later cleans up as usual."""
import signal
import sys


def on_interrupt(signum, frame) -> None:
    print("error: interrupted by the user", file=sys.stderr, flush=True)
    sys.exit(130)


try:
    signal.signal(signal.SIGINT, on_interrupt)
except ValueError:          # imported outside the main thread (not an entry point): Python's handler stays
    pass
