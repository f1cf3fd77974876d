"""``drvbox hw``: feed and observe the simulated hardware from outside the drivers."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("hw", help="feed and observe the simulated hardware",
                       description="Talk to the simulated devices of a running Device Manager, the way "
                                   "the outside world would: bytes arriving on a UART, a GPIO pin changing.")
    hw = p.add_subparsers(dest="hw_verb", metavar="HWVERB", required=True)
    q = hw.add_parser("ls", help="the simulated devices, their windows, IRQs and state")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run, build=lambda a: {"verb": "ls"})
    q = hw.add_parser("uart-feed", help="bytes arrive on a UART's receive line")
    q.add_argument("device", help="simulated device name, e.g. UART1")
    q.add_argument("data", help="text, or hex with --hex")
    q.add_argument("--hex", action="store_true")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run, build=lambda a: {"verb": "uart-feed", "device": a.device,
                                              **({"hex": a.data} if a.hex else {"text": a.data})})
    q = hw.add_parser("uart-tx", help="take what a UART has transmitted so far")
    q.add_argument("device")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run, build=lambda a: {"verb": "uart-take-tx", "device": a.device})
    q = hw.add_parser("gpio-set", help="drive a GPIO input pin high or low")
    q.add_argument("device")
    q.add_argument("pin", type=int)
    q.add_argument("level", type=int, choices=(0, 1))
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run, build=lambda a: {"verb": "gpio-set", "device": a.device, "pin": a.pin, "level": a.level})


def run(args) -> int:
    from reflector.client import connect
    try:
        with connect(args.socket) as dm:
            answer = dm.hw(args.build(args))
    except OSError as exc:
        print(f"drvbox hw {args.hw_verb}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=1))
    elif args.hw_verb == "ls":
        for d in answer["devices"]:
            print(json.dumps(d))
        held = answer.get("held")
        if held:
            dma = sum(b["size"] for b in held.get("dma", []))
            print(f"held: {len(held.get('claims', {}))} device claim(s), {len(held.get('interrupts', {}))} "
                  f"interrupt(s), {len(held.get('regions', []))} mapped region(s), "
                  f"{len(held.get('dma', []))} DMA buffer(s) of {dma} bytes")
            for buf in held.get("dma", []):
                print(f"  dma {buf['phys']:#x}+{buf['size']:#x}  {buf['holder']}")
    elif args.hw_verb == "uart-tx":
        sys.stdout.write(bytes.fromhex(answer["hex"]).decode("utf-8", "replace") + "\n")
    else:
        print(json.dumps(answer))
    return 0
