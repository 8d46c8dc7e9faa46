"""The console script `imagestream`: where every command starts, and where an unexpected error becomes one
line instead of a traceback.

A plain `imagestream run NAME COMMAND...` (no options; settings come from IMAGESTREAM_* variables) is a
container start, and a warm one has 0.25 s in all: it goes straight to `sandbox.run_command` without
loading the option parser (click and the other commands' modules take about 50 ms to import). It means
exactly what click would make of it, since `run` takes its options before NAME only (everything after
NAME is the command). Anything else goes through click (`imagestream_cli.main`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def guarded(call: Callable[[], object]) -> None:
    """Run the command; any error that is not one of ours is a one-line message too, never a traceback
    (IMAGESTREAM_DEBUG=1 shows the traceback)."""
    try:
        call()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the edge of the program
        if os.environ.get("IMAGESTREAM_DEBUG"):
            raise
        print(f"imagestream: error: {type(e).__name__}: {e} (internal error; IMAGESTREAM_DEBUG=1 shows where)",
              file=sys.stderr)
        sys.exit(1)


def plain_run(args: list[str]) -> bool:
    """`run NAME COMMAND...` with no option before NAME."""
    return len(args) >= 3 and args[0] == "run" and not args[1].startswith("-")


def entry() -> None:
    args = sys.argv[1:]
    if plain_run(args):
        from imagestream_cli import sandbox

        guarded(lambda: sandbox.run_command(args[1], args[2:]))
    else:
        from imagestream_cli.main import main

        guarded(lambda: main(standalone_mode=True))
