"""``drvbox fuzz DEV``: fuzz a device of a running Device Manager through the sandboxed path."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

EXIT_CLEAN, EXIT_FINDINGS, EXIT_USAGE, EXIT_DIFFERENT = 0, 1, 2, 3

DESCRIPTION = """\
Fuzz DEV, a device of a running Device Manager, through the real sandboxed path (the client
library, the policy checks, the host): IOCTLs with generated input buffers and output sizes, and
read/write/seek sequences on a handle that is reopened now and then.  A host that crashes, hangs or
breaks the protocol is a finding; the fuzzer reads its signal or exit status from the audit log,
waits for the restarted host (lifting a quarantine as `drvbox restart DEV` does, which needs root
or the Device Manager's owner) and goes on.

Codes: --codes, else the device's policy (--policy FILE|DIR, else the built-in platform's policies
in the state directory).  A few codes outside a policy's allowlist are tried too: EACCES is the
expected answer, anything else is a finding (not-refused).

Findings are bucketed by (kind, signal, exit status, operation, IOCTL code); each bucket has a case
file in --out (default <state dir>/fuzz/<DEV>-<time>-<pid>/), with the operations since the handle
was opened up to the failing one, and `drvbox fuzz DEV --replay CASE` does them again.  The same
--seed against the same driver gives the same operations.  Ctrl-C stops and still prints the
summary; every case is already on disk.  See docs/fuzzing.md."""

EPILOG = """\
exit status: 0 no finding; 1 findings (with --replay: the case reproduces); 2 usage error, or the
Device Manager or device could not be reached; 3 (--replay only) the case fails, but differently
from what it records.  Kinds: crash, hang, buffer.violation, protocol.violation, died-between,
not-refused, dm-closed, dm-gone."""


def register(sub) -> None:
    p = sub.add_parser("fuzz", help="fuzz a device's IOCTLs and read/write/seek through the sandbox",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("device", metavar="DEV", help="device name, e.g. COM1:")
    p.add_argument("--seed", type=_seed, default=None, help="seed of the operations (default: random, printed)")
    p.add_argument("--iterations", "-n", type=_positive_int, default=None, metavar="N",
                   help="stop after N operations")
    p.add_argument("--time", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop after SECONDS (default, without --iterations: 60)")
    p.add_argument("--codes", metavar="LIST", help="IOCTL codes and ranges to fuzz: 0x00220000,0x00220010-0x0022001C")
    p.add_argument("--policy", type=Path, metavar="FILE|DIR",
                   help="read DEV's IoctlAllow and MaxIoSize from this policy (or directory of policies)")
    p.add_argument("--max-io", type=_count, default=None, metavar="BYTES",
                   help="MaxIoSize to aim buffer sizes at (default: the policy's, else 1 MiB)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="where case files and summary.json go")
    p.add_argument("--replay", type=Path, default=None, metavar="CASE", help="replay one case file and say "
                   "whether it still reproduces (exit status 1 if it does, 0 if not)")
    p.add_argument("--restart-wait", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long a failed host may take to come back (default 30)")
    p.add_argument("--audit-wait", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="how long a failure's audit record may take to appear (default 5)")
    p.add_argument("--kernel-mode-ok", action="store_true",
                   help="fuzz a kernel-mode device even though a crash takes the Device Manager down")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=fuzz)


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal or 0x...)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a seed is not negative")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return value


def _count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def _note(text: str) -> None:
    print(f"drvbox fuzz: {text}", file=sys.stderr, flush=True)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _target(args):
    from reflector.fuzz import DEFAULT_MAX_IO, parse_codes, target_from_policy
    if args.codes:
        return parse_codes(args.codes, args.max_io if args.max_io is not None else DEFAULT_MAX_IO)
    places = [args.policy] if args.policy else [args.state_dir / "builtin" / "policies"]
    for place in places:
        if place.exists():
            target = target_from_policy(place, args.device)
            if target is not None:
                if args.max_io is not None:
                    from dataclasses import replace
                    target = replace(target, max_io=args.max_io)
                return target
    from reflector.fuzz import UsageError
    raise UsageError(f"no policy for {args.device} in {', '.join(map(str, places))}: give the codes to fuzz "
                     f"with --codes 0x...,0x...-0x..., or the policy with --policy FILE|DIR (the directory "
                     f"given to `drvbox run --policies`)")


def fuzz(args) -> int:
    from reflector.fuzz import UsageError
    from reflector.fuzz_run import Options
    opts = Options(socket=args.socket, device=args.device, state_dir=args.state_dir, seed=0,
                   out_dir=args.out, restart_wait_s=args.restart_wait, audit_wait_s=args.audit_wait,
                   kernel_ok=args.kernel_mode_ok, say=_note, progress=_progress)
    try:
        if args.replay is not None:
            return _replay(args, opts)
        target = _target(args)
    except UsageError as exc:
        _note(str(exc))
        return EXIT_USAGE
    opts.seed = args.seed if args.seed is not None else secrets.randbits(32)
    opts.iterations, opts.seconds = args.iterations, args.time
    if args.iterations is None and args.time is None:
        opts.seconds = 60.0
    _note(f"fuzzing {args.device} with seed {opts.seed} (codes from {target.source}; MaxIoSize {target.max_io}); "
          f"again: drvbox fuzz {args.device} --seed {opts.seed}")
    from reflector.fuzz_run import run
    report = run(opts, target)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        _table(report)
    if report.stopped:
        _note(report.stopped)
        if not report.findings:
            return EXIT_USAGE
    return EXIT_FINDINGS if report.findings else EXIT_CLEAN


def _replay(args, opts) -> int:
    from reflector.fuzz_cases import load_case
    from reflector.fuzz_run import replay
    case = load_case(args.replay)
    if case.device and case.device.rstrip(":").casefold() != args.device.rstrip(":").casefold():
        _note(f"{args.replay} was found on {case.device}; replaying it on {args.device} as asked")
    result = replay(opts, case)
    if args.json:
        print(json.dumps({"case": str(args.replay), "device": args.device, "reproduced": result.reproduced,
                          "kind": result.kind, "signal": result.signal, "status": result.status, "at": result.at,
                          "message": result.message}, indent=1))
    else:
        print(f"{args.replay}: {result.message}")
    if result.message.startswith("replay stopped"):
        return EXIT_USAGE
    if result.reproduced:
        return EXIT_FINDINGS
    return EXIT_DIFFERENT if result.kind is not None else EXIT_CLEAN


def _table(report) -> None:
    rate = report.iterations / report.elapsed_s if report.elapsed_s else 0.0
    how = " (interrupted)" if report.interrupted else " (stopped early)" if report.stopped else ""
    print(f"{report.device} {report.iterations} operations in {report.elapsed_s:.1f} s ({rate:.0f}/s), seed "
          f"{report.seed}{how}; {report.findings} findings in {len(report.buckets)} buckets; "
          f"{report.refused} refused by policy; {report.quarantines_lifted} quarantines lifted")
    if not report.buckets:
        return
    print()
    print(f"{'KIND':<20}{'SIGNAL':<9}{'STATUS':<8}{'OP':<7}{'CODE':<12}{'COUNT':<7}CASE")
    for b in report.buckets:
        print(f"{b['kind']:<20}{b['signal_name'] or '-':<9}{_dash(b['status']):<8}{b['op']:<7}{b['code'] or '-':<12}"
              f"{b['count']:<7}{b['case'] or '-'}")
    notes = {b["note"] for b in report.buckets if b["note"]}
    for note in sorted(notes):
        print(f"  note: {note}")
    print(f"\nreplay one: drvbox fuzz {report.device} --replay CASE")


def _dash(value) -> str:
    return "-" if value is None else str(value)
