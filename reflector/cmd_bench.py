"""``drvbox bench``: measure the request path against floors measured in the same run."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure request latency and throughput against this machine's floors",
        description="Measures floors (socket ping-pong over one and two hops, memcpy, python start-up), "
                    "then starts a real Device Manager with a sandboxed host and measures IOCTLs in kernel "
                    "and user mode, 1 MiB reads, host start and restart.  Reports ratios; medians throughout.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("-n", type=int, default=2000, help="round trips per latency measurement (default 2000)")
    p.set_defaults(func=run)


def run(args) -> int:
    from reflector.bench import measure, report
    result = measure(args.n, progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0
