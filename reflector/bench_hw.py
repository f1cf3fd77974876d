"""Register access and interrupt delivery on the simulated hardware: mapped versus mediated.

    drvbox bench --hw [--json]        (or: python -m reflector.bench_hw [--reads N] [--batches B] [--irqs K] [--json])

A real Device Manager (``drvbox run``, a subprocess) serves one bench driver three times, each on
its own simulated GPIO bank:

* ``MAP1:`` user mode, ``RegisterAccess=mapped``: the bank's register page is mapped into the
  sandboxed host; a register read is a memory read, a write reaches the model at the
  Reflector's next poll of the page (``reflector.hwresources.POLL_INTERVAL_S``);
* ``MED1:`` user mode, ``RegisterAccess=mediated``: every access is a KCALL to the Reflector,
  checked, with exact side effects; port reads (a 16550's scratch register) likewise;
* ``KRN1:`` kernel mode, mediated: the same checks called in-process (no host).

The driver measures itself (``time.perf_counter_ns`` in the driver) and answers JSON:

* register read / write cost: ``B`` batches of ``N`` accesses, per-access time per batch;
* interrupt latency *model -> driver*: a thread of the driver waits on the IRQ while another
  drives pin 0 high (rising edge enabled).  Mediated, the write is a KCALL and the model raises
  the line inside it, so the latency is half a round trip plus the eventfd wake-up.  Mapped, the
  write is a memory write and the latency is dominated by the poll interval.

Printed: medians, and the ratios mediated/mapped.  No thresholds: numbers are this machine's.
Without a cgroup for hosts here, the Device Manager runs with ``--allow-missing cgroup`` and the
report says so, as ``drvbox bench`` does.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from reflector.bench import allow_missing_here, wait_serving
from reflector.paths import audit_log_path

ROOT = Path(__file__).resolve().parent.parent
BENCH_IOCTL = 0x00220000

_DRIVER = textwrap.dedent('''
    """Bench driver written by bench/hw.py: measures its own register and interrupt costs."""
    import json
    import struct
    import threading
    import time

    from hosts import StreamDriver
    from hosts.ioctl import unpack_in

    DIR, OUT, LEVEL, RISE_EN, INT_CLEAR, OUT_SET, OUT_CLEAR = 0x00, 0x04, 0x08, 0x0C, 0x18, 0x1C, 0x20


    class Driver(StreamDriver):
        def init(self, ctx):
            self.k = ctx.kernel
            self.port = ctx.registry.get("IoBase")
            self.r = self.k.map_io_space(ctx.registry["MemBase"], 0x24)
            self.intr = self.k.interrupt(ctx.registry["Irq"])

        def _settle(self, reg):
            deadline = time.monotonic() + 5
            while self.r.read32(reg) and time.monotonic() < deadline:
                time.sleep(0.0001)

        def _per_op(self, fn, n, batches):
            out = []
            for _ in range(batches):
                t0 = time.perf_counter_ns()
                for i in range(n):
                    fn(i)
                out.append((time.perf_counter_ns() - t0) / n)
            return out

        def _irq_samples(self, k):
            r = self.r
            r.write32(DIR, 1)
            r.write32(RISE_EN, 1)
            r.write32(OUT_CLEAR, 1)
            self._settle(OUT_CLEAR)
            r.write32(INT_CLEAR, 1)
            self._settle(INT_CLEAR)
            while self.intr.wait(0.01):
                self.intr.done()
            samples = []
            woke = []
            go = threading.Event()

            def waiter():
                for _ in range(k):
                    go.wait()
                    go.clear()
                    if self.intr.wait(5):
                        woke.append(time.perf_counter_ns())
                    else:
                        woke.append(None)
            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            for _ in range(k):
                n = len(woke)
                go.set()
                time.sleep(0.001)                  # the waiter is in its wait
                t0 = time.perf_counter_ns()
                r.write32(OUT_SET, 1)              # rising edge on pin 0
                while len(woke) == n:
                    time.sleep(0.00005)
                samples.append(woke[-1] - t0 if woke[-1] is not None else None)
                r.write32(OUT_CLEAR, 1)
                self._settle(OUT_CLEAR)
                r.write32(INT_CLEAR, 1)
                self._settle(INT_CLEAR)
                self.intr.done()
            t.join(10)
            return samples

        def io_control(self, opened, code, inbuf, outbuf):
            n, batches, irqs = unpack_in(inbuf, "<III")
            r = self.r
            result = {
                "mode": r.mode,
                "read_ns": self._per_op(lambda i: r.read32(LEVEL), n, batches),
                "write_ns": self._per_op(lambda i: r.write32(RISE_EN, i & 1), n, batches),
                "irq_ns": self._irq_samples(irqs),
            }
            if self.port is not None:
                result["port_read_ns"] = self._per_op(lambda i: self.k.read_port(self.port + 7, 1), n, batches)
            data = json.dumps(result).encode()
            outbuf[:len(data)] = data
            return len(data)
''')


def _registry() -> str:
    devices, drivers = [], []
    for i, (prefix, user, access) in enumerate((("MAP", True, "mapped"), ("MED", True, "mediated"),
                                                ("KRN", False, "mediated")), start=1):
        mem, irq = 0x1000_0000 + i * 0x1000, 8 + i
        devices.append(f'[HKEY_LOCAL_MACHINE\\Platform\\Devices\\GPIO{i}]\n"Model"="gpio"\n'
                       f'"MemBase"=dword:{mem:X}\n"MemLen"=dword:1000\n"Irq"=dword:{irq:X}\n')
        port = '"IoBase"=dword:3F8\n"IoLen"=dword:8\n' if prefix == "MED" else ""
        drivers.append(f'[HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Bench{prefix}]\n"Dll"="hwbench.dll"\n'
                       f'"Prefix"="{prefix}"\n"Index"=dword:1\n"Order"=dword:{i}\n'
                       f'"Flags"=dword:{"10" if user else "0"}\n"UserProcGroup"=dword:{i}\n'
                       f'"MemBase"=dword:{mem:X}\n"MemLen"=dword:24\n"Irq"=dword:{irq:X}\n{port}'
                       f'"RegisterAccess"="{access}"\n"IoctlAllow"=multi_sz:"0x00220000"\n"MaxIoSize"=dword:10000\n')
    devices.append('[HKEY_LOCAL_MACHINE\\Platform\\Devices\\UART1]\n"Model"="uart16550"\n'
                   '"IoBase"=dword:3F8\n"IoLen"=dword:8\n"Irq"=dword:4\n')
    groups = [f'[HKEY_LOCAL_MACHINE\\Drivers\\ProcGroup_{i:04d}]\n"ProcName"="udevice.exe"\n'
              f'"ProcTimeout"=dword:EA60\n' for i in (1, 2)]
    return "REGEDIT4\n\n" + "\n".join(devices + drivers + groups)


def _prepare(tmp: Path) -> list[str]:
    """Driver, registry, key and signed policies; returns the `drvbox run` command line."""
    from policy.regfile import parse_files
    from reflector.devkeys import new_trust, sign_user_policies
    drivers = tmp / "drivers"
    drivers.mkdir()
    (drivers / "hwbench.py").write_text(_DRIVER)
    reg = tmp / "hw.reg"
    reg.write_text(_registry())
    keys, policies, trust = tmp / "keys", tmp / "policies", tmp / "trust"
    for d in (keys, policies, trust):
        d.mkdir()
    sign_user_policies(parse_files([reg]).hive, [drivers], new_trust(keys, trust, "bench"), policies)
    return [sys.executable, "-m", "reflector.cli", "--state-dir", str(tmp / "state"), "--socket", str(tmp / "dm.sock"),
            "run", "--registry", str(reg), "--policies", str(policies), "--trust", str(trust),
            "--driver-path", str(drivers)]


def measure(reads: int, batches: int, irqs: int) -> dict:
    import struct
    from reflector.client import connect
    allow, cgroup_missing = allow_missing_here()
    with tempfile.TemporaryDirectory(prefix="drvbox-hwbench-") as t:
        tmp = Path(t)
        cmd = _prepare(tmp) + allow
        with open(tmp / "dm.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                wait_serving(tmp / "dm.sock", proc, log=tmp / "dm.log", audit=audit_log_path(tmp / "state"))
                raw = {}
                with connect(tmp / "dm.sock") as dm:
                    for name in ("MAP1:", "MED1:", "KRN1:"):
                        with dm.open(name) as h:
                            out = h.ioctl(BENCH_IOCTL, struct.pack("<III", reads, batches, irqs), out_size=65536)
                            raw[name] = json.loads(out)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result = summarise(raw)
    result["cgroup_missing"] = cgroup_missing
    return result


def _median_us(values: list) -> float | None:
    return round(statistics.median(values) / 1000, 3) if values else None


def summarise(raw: dict) -> dict:
    out = {}
    for name, key in (("MAP1:", "user_mapped"), ("MED1:", "user_mediated"), ("KRN1:", "kernel_mediated")):
        r = raw[name]
        irq = [x for x in r["irq_ns"] if x is not None]
        out[key] = {"read_us": _median_us(r["read_ns"]), "write_us": _median_us(r["write_ns"]),
                    "irq_latency_us": _median_us(irq), "irq_samples": len(irq),
                    "irq_missed": len(r["irq_ns"]) - len(irq)}
        if "port_read_ns" in r:
            out[key]["port_read_us"] = _median_us(r["port_read_ns"])

    def ratio(a, b):
        return round(a / b, 1) if a and b else None
    m, d = out["user_mapped"], out["user_mediated"]
    out["ratios"] = {"mediated_over_mapped_read": ratio(d["read_us"], m["read_us"]),
                     "mediated_over_mapped_write": ratio(d["write_us"], m["write_us"]),
                     "mapped_over_mediated_irq_latency": ratio(m["irq_latency_us"], d["irq_latency_us"])}
    from reflector.hwresources import POLL_INTERVAL_S
    out["poll_interval_us"] = POLL_INTERVAL_S * 1e6
    return out


def report(r: dict) -> str:
    lines = [f"{'':18}{'read':>12}{'write':>12}{'port read':>12}{'irq latency':>14}   (medians, us)"]
    for key in ("user_mapped", "user_mediated", "kernel_mediated"):
        v = r[key]
        port = v.get("port_read_us")
        lines.append(f"{key:18}{v['read_us']:>12}{v['write_us']:>12}{port if port is not None else '-':>12}"
                     f"{v['irq_latency_us'] if v['irq_latency_us'] is not None else '-':>14}")
    q = r["ratios"]
    lines.append(f"mediated/mapped: reads x{q['mediated_over_mapped_read']}, writes x{q['mediated_over_mapped_write']}; "
                 f"mapped/mediated interrupt latency x{q['mapped_over_mediated_irq_latency']} "
                 f"(mapped writes wait for the {r['poll_interval_us']:.0f} us poll)")
    if r.get("cgroup_missing"):
        lines.append(f"hosts ran without a cgroup (--allow-missing cgroup): {r['cgroup_missing']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=500, help="accesses per batch (default 500)")
    ap.add_argument("--batches", type=int, default=7, help="batches per measurement (default 7)")
    ap.add_argument("--irqs", type=int, default=50, help="interrupt samples per device (default 50)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    result = measure(args.reads, args.batches, args.irqs)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
