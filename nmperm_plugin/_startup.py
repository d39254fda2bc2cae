"""Imported first by ``nmperm_plugin``: run as the ``nmperm`` command, a Ctrl-C during the seconds of
imports before the command starts (torch, transformers) ends it with a one-line message and status 130,
as its interrupts always do, not a traceback. ``nmperm_plugin.cli.commands.main`` restores the usual handling
(``KeyboardInterrupt``) as it starts. Imported as a library, nothing changes."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    sys.stderr.write("nmperm: interrupted while starting (nothing was read or written)\n")
    sys.stderr.flush()
    os._exit(130)


def _is_command() -> bool:
    """Whether this process is the ``nmperm`` command (its script, or ``python -m nmperm_plugin.cli``)."""
    return os.path.basename(sys.argv[0]) in ("nmperm", "nmperm.exe") or "nmperm_plugin.cli" in getattr(
        sys, "orig_argv", ()
    )


if _is_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread: leave it
        pass
