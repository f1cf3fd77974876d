"""``drvbox bench``: measure the request path against floors measured in the same run."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure request latency and throughput against this machine's floors",
        description="Measures floors (socket ping-pong over one and two hops, memcpy, python start-up), "
                    "then starts a real Device Manager with a sandboxed host and measures IOCTLs in kernel "
                    "and user mode, 1 MiB reads (user mode into a shared buffer and into a private one, and "
                    "kernel mode), host start and restart.  Reports ratios; medians throughout; a table, or "
                    "with --json one object (keys floor_1hop_us, floor_2hop_us, ioctl_kernel_us, "
                    "ioctl_user_us, ioctl_user_p99_us, memcpy_1mib_bps, read_1mib_bps, read_1mib_copy_bps, "
                    "read_1mib_kernel_bps, python_start_ms, host_start_ms, host_restart_ms, ratio_*, cgroup_missing).  "
                    "With --hw, also register access on the simulated hardware (mapped versus mediated) "
                    "and interrupt delivery latency from the model to the driver.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("-n", type=int, default=2000, help="round trips per latency measurement (default 2000)")
    p.add_argument("--hw", action="store_true", help="also measure the simulated hardware paths")
    p.add_argument("--pin", type=int, metavar="CPU", default=None,
                   help="run everything (this process, the Device Manager, its hosts, the floors' peers) on "
                        "one CPU: same-core hand-overs, repeatable numbers.  Unpinned, wake-ups across cores "
                        "make both the floors and the paths several times slower and noisier")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from reflector.bench import measure, report
    progress = lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.pin is not None:
        try:
            os.sched_setaffinity(0, {args.pin})       # inherited by every process started from here on
        except OSError as exc:
            print(f"drvbox bench: cannot pin to CPU {args.pin}: {exc.strerror} "
                  f"(CPUs here: {sorted(os.sched_getaffinity(0))})", file=sys.stderr)
            return 2
    result = measure(args.n, progress=progress)
    result["pinned_cpu"] = args.pin
    text = report(result)
    if args.hw:
        from reflector import bench_hw
        progress("simulated hardware: mapped and mediated register access, interrupt latency")
        result["hw"] = bench_hw.measure(500, 7, 50)
        text += "\n\n" + bench_hw.report(result["hw"])
    print(json.dumps(result, indent=1) if args.json else text)
    return 0
