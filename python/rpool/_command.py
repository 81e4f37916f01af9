"""The command line of exec'd workers and fork servers.

Made without importing multiprocessing, so that `rpool.get_context("forkserver").Pool` can start
its fork server before it imports rpool.pool (see `EarlyForkServer`).
"""

from __future__ import annotations

import os
import sys


def exec_command(entry: str) -> list[str]:
    """The command line of an exec'd worker: the stdlib's interpreter and flags for its own."""
    spawn = sys.modules.get("multiprocessing.spawn")  # set_executable() may have changed it
    exe = sys.executable if spawn is None else spawn.get_executable()
    return [os.fsdecode(exe), *interpreter_flags(), "-c", f"from rpool._worker import {entry}; {entry}()"]


# Single-letter options for sys.flags, in the order subprocess._args_from_interpreter_flags
# gives them (after -O).
_FLAG_OPTIONS = (("debug", "d"), ("dont_write_bytecode", "B"), ("no_site", "S"), ("verbose", "v"),
                 ("bytes_warning", "b"), ("quiet", "q"))  # fmt: skip


def interpreter_flags() -> list[str]:
    """`subprocess._args_from_interpreter_flags()`: the options that give a worker this
    interpreter's settings. Without importing subprocess (a few ms of each pool's start-up)
    unless -W or -X options are in play."""
    if sys.warnoptions or sys._xoptions or sys.flags.dev_mode:
        from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

        flags: list[str] = _args_from_interpreter_flags()
        return flags
    args = ["-" + "O" * sys.flags.optimize] if sys.flags.optimize else []
    args += ["-" + letter * getattr(sys.flags, name) for name, letter in _FLAG_OPTIONS if getattr(sys.flags, name) > 0]
    if sys.flags.isolated:
        args.append("-I")
    else:
        args += [option for option, on in (("-E", sys.flags.ignore_environment), ("-s", sys.flags.no_user_site),
                                           ("-P", sys.flags.safe_path)) if on]  # fmt: skip
    return args
