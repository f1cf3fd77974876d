"""``drvbox``: the command line.

Each group of verbs lives in its own ``cmd_*`` module with a ``register(subparsers)`` function
that adds its parsers and sets ``func`` to a function taking the parsed ``args`` and returning the
exit status.  Global options (``--state-dir``, ``--socket``, ``-v``) are resolved here, once, so
every verb sees ``args.state_dir`` and ``args.socket`` as paths.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from reflector import paths

# The verb groups, in the order --help lists them.  Imported lazily so that `drvbox ls` does not
# pay for the policy toolchain and `drvbox policy` does not pay for the Device Manager.
COMMAND_MODULES = (
    "reflector.cmd_run",
    "reflector.cmd_client",
    "reflector.cmd_policy",
    "reflector.cmd_audit",
    "reflector.cmd_sandbox",
    "reflector.cmd_hw",
    "reflector.cmd_bench",
    "reflector.cmd_fuzz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drvbox",
        description="Run untrusted device drivers in sandboxed host processes "
                    "(a User Mode Driver Framework for Linux).",
        epilog="Start with `drvbox run` (the built-in simulated platform), then, from another "
               "shell, `drvbox ls` and `drvbox write COM1: hello`.  `drvbox VERB --help` explains each verb.",
    )
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="state directory (default: $DRVBOX_STATE_DIR, /var/lib/drvbox for root, "
                             "else $XDG_STATE_HOME/drvbox)")
    parser.add_argument("--socket", type=Path, default=None,
                        help="Device Manager socket (default: $DRVBOX_SOCKET, /run/drvbox.sock for root, "
                             "else $XDG_RUNTIME_DIR/drvbox.sock)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say more (repeat for even more)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:      # a verb group not built yet; any other missing import is a bug
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None or not hasattr(args, "func"):
        parser.print_help()
        return 2
    args.state_dir = args.state_dir or paths.default_state_dir()
    args.socket = args.socket or paths.default_socket()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if not _is_user_error(exc):
            raise                      # a bug of ours: the traceback is what a report needs
        print(f"drvbox {args.verb}: {exc}", file=sys.stderr)
        return 1


# Errors that describe bad input or a machine that lacks something, each with its own message
# (file:line:col, the value, the fix): printed as they are, without a traceback.  Named by module
# so that a verb that never imported one does not import it just to catch it.
_USER_ERRORS = (
    ("policy.errors", "PolicyError"),
    ("policy.regfile", "RegistryError"),
    ("policy.audit_format", "AuditError"),
    ("sandbox.errors", "ConfinementError"),
)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
