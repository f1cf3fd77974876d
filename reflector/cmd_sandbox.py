"""``drvbox sandbox check [--json]``: is confinement in force on this machine?"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sandbox", help="inspect host confinement",
        description="Confinement of driver hosts.")
    sub = parser.add_subparsers(dest="sandbox_verb", metavar="ACTION")
    check = sub.add_parser(
        "check", help="start a probe in a fresh sandbox and show what is in force",
        description="Start a probe in a fresh sandbox and print, mechanism by mechanism, what is in "
                    "force as read back from inside (/proc/self/status, mountinfo, rlimits, cgroup, "
                    "network) and what the probe could still do.  Exits 1 if any mechanism is missing.")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    check.add_argument("--userns", action="store_true",
                       help="use a user namespace even as root (it is always used otherwise)")
    check.set_defaults(func=_check)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _check(args) -> int:
    from sandbox import check
    from sandbox.errors import ConfinementError
    from sandbox.spec import SandboxSpec

    # Without a cgroup the probe still runs, with the cgroup optional, so that every other
    # mechanism is reported; the cgroup is then reported MISSING with why, and we exit 1.
    missing = check.cgroup_unavailable()
    spec = SandboxSpec(name="drvbox sandbox check", memory_limit_mib=256, userns=True if args.userns else None,
                       optional=frozenset({"cgroup"}) if missing else frozenset())
    try:
        findings, raw = check.run(spec, cgroup_missing=missing)
    except ConfinementError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": {"step": exc.step, "call": exc.call, "errno": exc.errno,
                                                     "message": str(exc)}}, indent=2))
        else:
            print(f"drvbox sandbox check: could not start a sandbox: {exc}", file=sys.stderr)
        return 1
    ok = all(f.ok for f in findings)
    if args.json:
        print(json.dumps({"ok": ok, "mechanisms": [{"mechanism": f.mechanism, "ok": f.ok, "detail": f.detail,
                                                    "evidence": f.evidence} for f in findings],
                          "raw": raw}, indent=2, default=str))
    else:
        width = max(len(f.mechanism) for f in findings)
        for f in findings:
            print(f"{'ok     ' if f.ok else 'MISSING'}  {f.mechanism:<{width}}  {f.detail}")
        print("all mechanisms in force" if ok else
              "some mechanism is missing: hosts on this machine would not be fully confined")
    return 0 if ok else 1
