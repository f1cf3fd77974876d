"""Client verbs: ``drvbox ls``, ``read``, ``write``, ``ioctl``, ``restart``."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("ls", help="list devices and hosts",
                       description="List devices and their hosts.  For each host: its pid, state, uptime "
                                   "(s), PSS (memory, '-' when it cannot be read) and LANES busy/opened (the "
                                   "request channels it serves; '!' after a lane it refused, out of fds).")
    p.add_argument("--json", action="store_true", help="one JSON object: {\"devices\": [...], \"hosts\": [...]}")
    p.set_defaults(func=ls)

    p = sub.add_parser("read", help="read N bytes from a device", description="Open DEV, read up to N bytes, print them.")
    p.add_argument("device", metavar="DEV", help="device name, e.g. COM1:")
    p.add_argument("count", metavar="N", type=int)
    p.add_argument("--hex", action="store_true", help="print the bytes as hex instead of raw")
    p.set_defaults(func=read)

    p = sub.add_parser("write", help="write data to a device", description="Open DEV and write DATA to it.")
    p.add_argument("device", metavar="DEV")
    p.add_argument("data", metavar="DATA", help="the bytes to write (UTF-8 text, or hex with --hex)")
    p.add_argument("--hex", action="store_true", help="DATA is hex, e.g. 01ff20")
    p.set_defaults(func=write)

    p = sub.add_parser("ioctl", help="send an IOCTL to a device",
                       description="Open DEV and send IOCTL CODE (e.g. 0x001B0004) with optional input; "
                                   "prints the output bytes as hex.")
    p.add_argument("device", metavar="DEV")
    p.add_argument("code", metavar="CODE", type=lambda s: int(s, 0))
    p.add_argument("--in", dest="inbuf", default="", metavar="HEX", help="input buffer as hex")
    p.add_argument("--out", dest="out", type=int, default=0, metavar="N", help="output buffer size in bytes")
    p.add_argument("--json", action="store_true", help="print {\"out\": hex, \"bytes\": n}")
    p.set_defaults(func=ioctl)

    p = sub.add_parser("restart", help="restart a device's host (also lifts a quarantine)",
                       description="Kill and restart the host serving DEV; lifts a quarantine. Root or the "
                                   "Device Manager's owner only.")
    p.add_argument("device", metavar="DEV")
    p.set_defaults(func=restart)


def _connect(args):
    from reflector.client import connect
    return connect(args.socket)


def _fail(args, exc: OSError) -> int:
    where = getattr(args, "device", None)
    # "drvbox ioctl COM1: Permission denied: ..." -- a device name brings its own colon.
    prefix = f"drvbox {args.verb} {where}" if where else f"drvbox {args.verb}"
    sep = " " if prefix.endswith(":") else ": "
    print(f"{prefix}{sep}{exc.strerror or exc}", file=sys.stderr)
    return 1


def _dash(value) -> str:
    return "-" if value is None else str(value)


def ls(args) -> int:
    try:
        with _connect(args) as dm:
            info = dm.devices()
    except OSError as exc:
        return _fail(args, exc)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{'DEVICE':<8}{'MODE':<8}{'GROUP':<8}{'STATE':<13}{'RESTARTS':<10}DRIVER")
    for d in info["devices"]:
        print(f"{d['name']:<8}{d['mode']:<8}{_dash(d['group']):<8}{d['state']:<13}{d['restarts']:<10}{d['driver']}")
    if info["hosts"]:
        print()
        print(f"{'HOST':<8}{'PID':<9}{'STATE':<13}{'UPTIME':<10}{'PSS':<10}{'LANES':<8}DEVICES")
        for h in info["hosts"]:
            pss = "-" if h.get("pss") is None else f"{h['pss'] // 1024}K"    # unreadable, or no host
            lanes = h.get("lanes")          # busy/made: requests on lanes now, of lanes opened
            lanes = "-" if not lanes else f"{lanes['busy']}/{lanes['made']}" + ("!" if lanes["refused"] else "")
            print(f"{h['group']:<8}{h['pid']!s:<9}{h['state']:<13}{h['uptime']:<10.0f}{pss:<10}{lanes:<8}"
                  f"{' '.join(h['devices'])}")
    return 0


def read(args) -> int:
    try:
        with _connect(args) as dm, dm.open(args.device, "r") as h:
            data = h.read(args.count)
    except OSError as exc:
        return _fail(args, exc)
    if args.hex:
        print(data.hex())
    else:
        sys.stdout.buffer.write(data)
        if sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
    return 0


def write(args) -> int:
    try:
        data = bytes.fromhex(args.data) if args.hex else args.data.encode()
    except ValueError as exc:
        print(f"drvbox write: DATA is not hex: {exc}", file=sys.stderr)
        return 2
    try:
        with _connect(args) as dm, dm.open(args.device, "w") as h:
            n = h.write(data)
    except OSError as exc:
        return _fail(args, exc)
    print(f"{n} bytes written to {args.device}")
    return 0


def ioctl(args) -> int:
    try:
        inbuf = bytes.fromhex(args.inbuf)
    except ValueError as exc:
        print(f"drvbox ioctl: --in is not hex: {exc}", file=sys.stderr)
        return 2
    try:
        with _connect(args) as dm, dm.open(args.device, "rw") as h:
            out = h.ioctl(args.code, inbuf, out_size=args.out)
    except OSError as exc:
        return _fail(args, exc)
    if args.json:
        print(json.dumps({"out": out.hex(), "bytes": len(out)}))
    else:
        print(out.hex() if out else f"ok ({args.code:#010x}, no output)")
    return 0


def restart(args) -> int:
    try:
        with _connect(args) as dm:
            dm.restart(args.device)
    except OSError as exc:
        return _fail(args, exc)
    print(f"{args.device}: host restarting")
    return 0
