"""``drvbox fuzz DEV``: fuzz a device of a running Device Manager through the sandboxed path."""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path

EXIT_CLEAN, EXIT_FINDINGS, EXIT_USAGE, EXIT_DIFFERENT = 0, 1, 2, 3
MAX_IO_LIMIT = 1 << 30        # the policy schema's largest max_io_size: buffers live in the host's arena

DESCRIPTION = """\
Fuzz DEV, a device of a running Device Manager, through the real sandboxed path (the client
library, the policy checks, the host): IOCTLs with generated input buffers and output sizes
(mostly small, some at MaxIoSize and one past it), and read/write/seek sequences on a handle that
is reopened now and then.  A host that crashes, hangs or breaks the protocol is a finding; the
fuzzer reads its signal or exit status from the audit log, waits for the restarted host (lifting a
quarantine as `drvbox restart DEV` does, which needs root or the Device Manager's owner) and goes
on.

Give the global --state-dir and --socket of the Device Manager being fuzzed: its audit log says
how a host died (the fuzzer says so when the log is another's).  Codes: --codes, else the
device's policy (--policy FILE|DIR, else the built-in platform's policies in the state
directory).  A few codes outside a policy's allowlist are tried too: EACCES is the expected
answer, anything else is a finding (not-refused).

Findings are bucketed by (kind, signal, exit status, operation, IOCTL code); each bucket has a case
file in --out (default <state dir>/fuzz/<DEV>-<time>-<pid>/), with the operations since the handle
was opened up to the failing one, and `drvbox fuzz DEV --replay CASE` does them again.  The same
--seed against the same driver gives the same operations.  Ctrl-C stops and still prints the
summary; every case is already on disk.  See docs/fuzzing.md."""

EPILOG = """\
findings (kinds): crash (the host died: signal or exit status from the audit log), hang (no answer
within ProcTimeout), buffer.violation / protocol.violation (the host broke the protocol and was
killed), died-between (the host died between our requests), not-refused (a code outside the
policy's allowlist reached the driver), dm-closed / dm-gone (the Device Manager dropped us / went
away).  An errno the driver chose (EINVAL, ENOTTY, ...) is not a finding; neither is EACCES or
EMSGSIZE, the policy refusing a code or a size.

exit status (an interrupted run too): 0 no finding; 1 findings (with --replay: the case
reproduces); 2 usage error, or the Device Manager or device could not be reached, or the run
stopped before any finding (with --replay: the replay could not run); 3 (--replay only) the case
fails, but differently from what it records.

examples:
  drvbox fuzz COM1: --time 300                 codes from COM1:'s policy, random seed (printed)
  drvbox fuzz MYD1: --policy pol/ --seed 7 -n 5000 --json
  drvbox fuzz MYD1: --codes 0x00220000-0x0022003C --max-io 4096
  drvbox fuzz MYD1: --replay <state dir>/fuzz/MYD1-.../case-001-crash-ioctl-00220008.json"""


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
    p.add_argument("--max-io", type=_max_io, default=None, metavar="BYTES",
                   help="MaxIoSize to aim buffer sizes at (default: the policy's, else 1 MiB; at most 1 GiB)")
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


def _max_io(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_IO_LIMIT:
        # Buffers up to one past it are built in memory: an unbounded value would exhaust ours.
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count from 0 to {MAX_IO_LIMIT} (1 GiB, the "
                                         f"largest MaxIoSize a policy may hold)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


class Stderr:
    """Notes and the progress line, on stderr.

    On a terminal the progress line is redrawn in place, and a note first clears it.  Otherwise
    (a log file, a CI job) each progress line stays, so it comes at most every ``quiet_s``
    seconds: a one-hour run leaves a readable log, not 3600 lines."""

    def __init__(self, stream=None, clock=time.monotonic, quiet_s: float = 5.0):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.clock, self.quiet_s = clock, quiet_s
        self._last: float | None = None
        self._drawn = False

    def note(self, text: str) -> None:
        self._clear()
        print(f"drvbox fuzz: {text}", file=self.stream, flush=True)

    def progress(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()
            self._drawn = True
            return
        now = self.clock()
        if self._last is None or now - self._last >= self.quiet_s:
            self._last = now
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        """The run is over: the summary must not land on the progress line."""
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _target(args, device: str):
    from reflector.fuzz import DEFAULT_MAX_IO, UsageError, parse_codes, target_from_policy
    if args.codes:
        return parse_codes(args.codes, args.max_io if args.max_io is not None else DEFAULT_MAX_IO)
    place = args.policy or args.state_dir / "builtin" / "policies"
    try:
        # Path.exists() and is_dir() raise EACCES under a directory we may not search.
        if args.policy is not None and not args.policy.exists():
            raise UsageError(f"--policy {args.policy}: no such file or directory; give the policy file of "
                             f"{device} or the directory given to `drvbox run --policies`")
        target = target_from_policy(place, device) if place.exists() else None
    except PermissionError as exc:
        raise UsageError(f"cannot read the policies at {place} ({exc.strerror}): give a copy you can read with "
                         f"--policy FILE|DIR, or the codes with --codes 0x...,0x...-0x...") from None
    if target is None:
        where = f"{place}" if args.policy else f"{place} (the built-in platform's; --policy for others)"
        raise UsageError(f"no policy of {device} in {where}: give the policy with --policy FILE|DIR (the "
                         f"directory given to `drvbox run --policies`), or the codes to fuzz with --codes "
                         f"0x...,0x...-0x...")
    if args.max_io is not None:
        from dataclasses import replace
        target = replace(target, max_io=args.max_io)
    return target


def _again(args, device: str, seed: int) -> str:
    """The command that makes the same operations again (the seed, the codes, the bounds)."""
    words = ["drvbox", "fuzz", device, "--seed", str(seed)]
    for flag, value in (("--codes", args.codes), ("--policy", args.policy), ("--max-io", args.max_io),
                        ("--iterations", args.iterations), ("--time", args.time)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def fuzz(args) -> int:
    from reflector.fuzz import FuzzStop, UsageError
    from reflector.fuzz_run import Options, resolve_device, run
    err = Stderr()
    opts = Options(socket=args.socket, device=args.device, state_dir=args.state_dir, seed=0,
                   out_dir=args.out, restart_wait_s=args.restart_wait, audit_wait_s=args.audit_wait,
                   kernel_ok=args.kernel_mode_ok, say=err.note, progress=err.progress)
    try:
        if args.replay is not None:
            return _replay(args, opts, err)
        # The device first: a typo in DEV or a Device Manager that is not running is the problem
        # to report, not the policy that could not be found for it.
        opts.device = resolve_device(opts)
        target = _target(args, opts.device)
    except (UsageError, FuzzStop) as exc:
        err.note(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.note("interrupted before the first operation")
        return EXIT_USAGE
    opts.seed = args.seed if args.seed is not None else secrets.randbits(32)
    opts.iterations, opts.seconds = args.iterations, args.time
    if args.iterations is None and args.time is None:
        opts.seconds = 60.0
    bound = (f"{opts.iterations} operations" if opts.seconds is None else f"{opts.seconds:g} s" if
             opts.iterations is None else f"{opts.iterations} operations or {opts.seconds:g} s")
    err.note(f"fuzzing {opts.device} for {bound} with seed {opts.seed} (codes from {target.source}; MaxIoSize "
             f"{target.max_io}); the same operations again: {_again(args, opts.device, opts.seed)}")
    # SIGTERM (`timeout 600 drvbox fuzz ...` in CI, a service stop) ends the run as Ctrl-C does:
    # with the summary written, instead of with nothing said.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(opts, target)
    finally:
        signal.signal(signal.SIGTERM, previous)
    err.done()
    if report.stopped and not report.iterations and not report.findings and not args.json:
        err.note(report.stopped)          # nothing ran: a table of zeros would only hide the reason
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        _table(report)
    if report.stopped:
        err.note(report.stopped)
        if not report.findings:
            return EXIT_USAGE
    return EXIT_FINDINGS if report.findings else EXIT_CLEAN


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _replay(args, opts, err: Stderr) -> int:
    from reflector.fuzz_cases import load_case
    from reflector.fuzz_run import replay
    case = load_case(args.replay)
    if case.device and case.device.rstrip(":").casefold() != args.device.rstrip(":").casefold():
        err.note(f"{args.replay} was found on {case.device}; replaying it on {args.device} as asked")
    result = replay(opts, case)
    if args.json:
        print(json.dumps({"case": str(args.replay), "device": args.device, "reproduced": result.reproduced,
                          "kind": result.kind, "signal": result.signal, "status": result.status, "at": result.at,
                          "message": result.message}, indent=1))
    else:
        print(f"{args.replay}: {result.message}")
    if result.stopped:
        return EXIT_USAGE
    if result.reproduced:
        return EXIT_FINDINGS
    return EXIT_DIFFERENT if result.kind is not None else EXIT_CLEAN


def _table(report) -> None:
    from reflector.fuzz_run import plural
    rate = report.iterations / report.elapsed_s if report.elapsed_s else 0.0
    how = " (interrupted)" if report.interrupted else " (stopped early)" if report.stopped else ""
    print(f"{report.device} {report.iterations} operations in {report.elapsed_s:.1f} s ({rate:.0f}/s), seed "
          f"{report.seed}{how}; {plural(report.findings, 'finding')} in {plural(len(report.buckets), 'bucket')}; "
          f"{report.refused} refused by policy; {plural(report.quarantines_lifted, 'quarantine')} lifted")
    _where(report)
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


def _where(report) -> None:
    if report.out_dir:
        print(f"summary.json{' and case files' if report.buckets else ''} in {report.out_dir}")


def _dash(value) -> str:
    return "-" if value is None else str(value)
