"""``drvbox run``: the Device Manager in the foreground."""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run the Device Manager in the foreground",
        description="Load the registry, accept the signed policies, start the drivers (kernel-mode ones "
                    "in this process, user-mode ones in sandboxed hosts) and serve applications on the "
                    "socket until SIGINT/SIGTERM.  With no --registry, runs the built-in simulated "
                    "platform (COM1:, DSK1:, GIO1:) with policies signed by a development key.")
    p.add_argument("--registry", action="append", type=Path, default=[], metavar="FILE",
                   help="a .reg file; repeat to merge several (later files win)")
    p.add_argument("--driver-path", action="append", type=Path, default=[], metavar="DIR",
                   help="where driver modules are looked up (repeatable)")
    p.add_argument("--policies", type=Path, metavar="DIR", help="directory of signed policies (*.json)")
    p.add_argument("--trust", type=Path, metavar="DIR", help="trust store: a directory of *.pub keys")
    p.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                   help="define a registry preprocessor variable ($(NAME), #if, IF)")
    p.add_argument("--allow-missing", action="append", default=[], metavar="MECHANISM",
                   help="run even if this confinement mechanism is unavailable here (e.g. cgroup); "
                        "without it drvbox refuses to start a host that would be less confined")
    p.set_defaults(func=run)


def _defines(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"drvbox run: -D {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _cgroup_missing(dm, config) -> str | None:
    """Why no host of ``dm`` could get a cgroup here, when one is needed (user-mode drivers, and
    the cgroup not accepted as missing with --allow-missing cgroup); else None."""
    if not dm.groups or "cgroup" in config.sandbox_optional:
        return None
    from sandbox.check import cgroup_unavailable
    return cgroup_unavailable()


def run(args) -> int:
    from reflector.devmgr import DeviceManager, RunConfig
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
                        format="drvbox: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("drvbox").setLevel(logging.INFO if args.verbose <= 1 else logging.DEBUG)
    config = RunConfig(state_dir=args.state_dir, socket=args.socket, registry=args.registry,
                       driver_path=args.driver_path, policies=args.policies, trust=args.trust,
                       defines=_defines(args.defines), sandbox_optional=frozenset(args.allow_missing))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dm = DeviceManager(config)
    dm.on_fatal = stop.set
    from reflector.server import Server, SocketBusy
    server = Server(dm, args.socket)
    try:
        # The socket first: a second Device Manager pointed at a live one's socket must stop
        # before it loads a driver, starts a host or writes to an audit log.
        server.claim()
    except SocketBusy as exc:
        raise SystemExit(f"drvbox run: {exc}") from None
    try:
        dm.load()
        missing = _cgroup_missing(dm, config)
        if missing is not None:
            # Said once, before any host starts: otherwise every host fails its start on it, again
            # and again, until its drivers are quarantined.
            from sandbox.errors import ConfinementError
            raise ConfinementError("cgroup", missing, errno.ENOTSUP, name="hosts")
        dm.start()
        server.start()
        described = dm.describe()
        for d in described["devices"]:
            print(f"drvbox: {d['name']:<6} {d['mode']:<6} group {'-' if d['group'] is None else d['group']!s:<6} {d['state']:<11} {d['key']}",
                  file=sys.stderr)
        print(f"drvbox: serving on {args.socket} (state in {args.state_dir}); Ctrl-C to stop", file=sys.stderr)
        stop.wait()
        print("drvbox: stopping", file=sys.stderr)
    except OSError:
        if dm.fatal is None:           # an audit log that failed during start-up is said below
            raise
    finally:
        server.stop()
        dm.stop()
    if dm.fatal is not None:
        raise SystemExit(f"drvbox run: {dm.fatal}")
    return 0
