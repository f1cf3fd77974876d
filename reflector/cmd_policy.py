"""``drvbox keys new`` and ``drvbox policy derive|sign|verify|show``: the policy toolchain's verbs.

Exit status: 0 success, 1 when something was refused or failed (the message names the file, the
value and the fix), 2 for a command line that does not parse.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from policy.fileio import write_atomic
from policy.errors import PolicyError

_KEYS_HELP = """\
Signing keys for policies (Ed25519).

  drvbox keys new NAME [--out DIR]

writes DIR/NAME.key (the private key, mode 0600: keep it off the target) and DIR/NAME.pub.
A trust store is a directory of *.pub files: copy NAME.pub into the directory the Device
Manager reads with `drvbox run --trust DIR`.  A key's id is the SHA-256 of its public key."""

_POLICY_HELP = """\
From registry files to signed policies, in three steps:

  drvbox policy derive platform.reg -o policies/      one policy document per driver key
  drvbox keys new release --out keys/                 once
  drvbox policy sign --key keys/release.key policies/*.json
  drvbox policy verify --trust trust/ policies/*.json

`derive` prints what each driver is granted; read it before you sign it."""


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="create policy signing keys", description=_KEYS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ksub = keys.add_subparsers(dest="keys_verb", metavar="ACTION")
    new = ksub.add_parser("new", help="create NAME.key and NAME.pub", description=_KEYS_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("name", metavar="NAME", help="key name: letters, digits, '_', '.', '-'")
    new.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="directory to write the pair into (default: the current directory)")
    new.set_defaults(func=cmd_keys_new)
    keys.set_defaults(func=lambda args: _usage(keys))

    pol = subparsers.add_parser("policy", help="derive, sign, verify and show driver policies",
                                description=_POLICY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = pol.add_subparsers(dest="policy_verb", metavar="ACTION")
    pol.set_defaults(func=lambda args: _usage(pol))

    d = psub.add_parser("derive", help="turn the driver keys of .reg files into policy documents",
                        description="Read REG files in order (later files win), find every driver key under "
                                    "HKLM\\Drivers\\BuiltIn, and write one policy document per driver into DIR, "
                                    "named after the key.  Prints what each driver is granted, and warns about "
                                    "whatever the registry leaves wide open (no IoctlAllow, added Syscalls, ...).")
    d.add_argument("reg", nargs="+", type=Path, metavar="REG", help="registry files (.reg), in order")
    d.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="directory for the policy files")
    d.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                   help="define a preprocessor name for IF/#if and $(NAME) (repeatable; NAME alone means 1)")
    d.add_argument("--driver-path", action="append", type=Path, default=[], metavar="DIR",
                   help="where driver modules are looked up to pin their SHA-256 (repeatable; "
                        "default: the directories of the REG files)")
    d.add_argument("--strict", action="store_true", help="treat the registry problems a tolerant parse skips as errors")
    d.add_argument("--serial", type=int, metavar="N", help="policy serial (default: the current Unix time, so a "
                   "later derivation never looks like a rollback)")
    d.add_argument("--expires", metavar="WHEN", help="expiry, RFC 3339 (2030-01-01T00:00:00Z) or a number of days (90d)")
    d.add_argument("--json", action="store_true", help='print [{"key","name","mode","group","file","warnings"}] instead of a table')
    d.set_defaults(func=cmd_derive)

    s = psub.add_parser("sign", help="sign policy documents (or add a signature to signed ones)",
                        description="Turn each FILE into a signed envelope, in place unless -o is given.  A FILE "
                                    "that is already signed gets this key's signature added.  Refuses a document "
                                    "that is not a valid policy.")
    s.add_argument("--key", type=Path, required=True, metavar="KEY", help="private key from `drvbox keys new` (mode 0600)")
    s.add_argument("files", nargs="+", type=Path, metavar="FILE")
    s.add_argument("-o", "--out", type=Path, metavar="DIR", help="write the envelopes here instead of in place")
    s.set_defaults(func=cmd_sign)

    v = psub.add_parser("verify", help="check signed policies against a trust store",
                        description="Exit 0 only if every FILE is signed by a key in the trust store, is a valid "
                                    "policy and has not expired; otherwise say exactly why each one fails.  With "
                                    "--registry, also check them against the registry and the modules, as the Device "
                                    "Manager does (it also refuses serials lower than ones it accepted before).")
    v.add_argument("--trust", type=Path, required=True, metavar="DIR", help="directory of trusted *.pub keys")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE")
    v.add_argument("--registry", action="append", type=Path, default=[], metavar="REG",
                   help="also check each policy against this registry (repeatable, in order): the driver key "
                        "exists, its mode and hash match, and its module hashes as pinned")
    v.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE",
                   help="preprocessor names for --registry files")
    v.add_argument("--driver-path", action="append", type=Path, default=[], metavar="DIR",
                   help="where modules are looked up with --registry (default: the directories of the REG files)")
    v.set_defaults(func=cmd_verify)

    sh = psub.add_parser("show", help="print a policy, signed or not",
                         description="Print whether FILE is signed and by which key ids (checked against --trust "
                                     "when given), then the policy document.")
    sh.add_argument("file", type=Path, metavar="FILE")
    sh.add_argument("--trust", type=Path, metavar="DIR", help="also say which signatures verify against this trust store")
    sh.set_defaults(func=cmd_show)


def _usage(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _err(message: str) -> int:
    print(f"drvbox: {message}", file=sys.stderr)
    return 1


# --- keys new --------------------------------------------------------------------------------

def cmd_keys_new(args) -> int:
    from policy.signing import generate_key, key_id, load_public_key
    try:
        key_path, pub_path = generate_key(args.name, args.out)
    except (PolicyError, OSError) as exc:
        return _err(str(exc))
    print(f"private key: {key_path}  (mode 0600; keep it secret, off the target)")
    print(f"public key:  {pub_path}  (copy it into the trust directory: drvbox run --trust DIR)")
    print(f"key id:      {key_id(load_public_key(pub_path))}")
    return 0


# --- derive ----------------------------------------------------------------------------------

def _defines(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise PolicyError(f"-D {item!r}: {name!r} is not a preprocessor name (fix: -D NAME=VALUE)")
        out[name] = value if eq else "1"
    return out


def _expiry(text: str | None, now: datetime) -> datetime | None:
    from datetime import timedelta
    from policy.document import parse_datetime
    if text is None:
        return None
    m = re.fullmatch(r"(\d{1,5})d", text)
    if m:
        return now + timedelta(days=int(m.group(1)))
    try:
        return parse_datetime(text)
    except ValueError:
        raise PolicyError(f"--expires {text!r} is neither an RFC 3339 date-time (2030-01-01T00:00:00Z) "
                          "nor a number of days (90d)") from None


def policy_file_name(key_path: str) -> str:
    """``HKEY_LOCAL_MACHINE\\Drivers\\BuiltIn\\Serial`` -> ``BuiltIn.Serial.json``."""
    parts = key_path.split("\\")[2:] or key_path.split("\\")
    name = ".".join(re.sub(r"[^A-Za-z0-9_-]+", "_", p) for p in parts)
    return f"{name}.json"


def _fmt_windows(ws: list[dict]) -> str:
    return ", ".join(f"0x{w['base']:X}+0x{w['length']:X} {w['access']}" for w in ws) or "-"


def _fmt_ranges(rs) -> str:
    return ", ".join(f"0x{lo:08X}" if lo == hi else f"0x{lo:08X}-0x{hi:08X}" for lo, hi in rs) or "none"


def _grants(doc: dict) -> list[str]:
    res, io, cl = doc["resources"], doc["io"], doc["clients"]
    ioctls = "ALL (no IoctlAllow)" if io["ioctls"].get("all") else _fmt_ranges(io["ioctls"]["ranges"])
    if cl["users"] is None and cl["groups"] is None:
        clients = "everyone who can reach the socket"
    else:
        clients = "only " + "; ".join(f"{what} {', '.join(who)}" for what, who in
                                      (("users", cl["users"]), ("groups", cl["groups"])) if who) if (cl["users"] or cl["groups"]) else "nobody (empty AllowUsers/AllowGroups)"
    if cl["trusted_only"]:
        clients += " (root or owner only)"
    nodes = ", ".join(f"{n['path']} ({n['mode']}" + (f"; ioctls {_fmt_ranges(n['ioctls'])})" if n.get("ioctls") else ")")
                      for n in res["device_nodes"]) or "-"
    host = doc["host"]
    lines = [
        f"memory   {_fmt_windows(res['memory'])}",
        f"ports    {_fmt_windows(res['ports'])}",
        f"irqs     {', '.join(map(str, res['irqs'])) or '-'}   sysintrs {', '.join(map(str, res['sysintrs'])) or '-'}",
        f"ioctls   {ioctls}   max io {io['max_io_size']} bytes",
        f"dma      {res['dma_quota']} bytes   registers {res['register_access']}   nodes {nodes}",
        f"clients  {clients}",
        f"syscalls {', '.join(doc['syscalls']) or '-'}",
        f"module   {doc['driver']['module']['path'] or 'NOT FOUND'} "
        f"{(doc['driver']['module']['sha256'] or '')[:16]}",
    ]
    if host:
        lines.append(f"host     timeout {host['timeout_ms']} ms, restarts {host['restart_limit']}/{host['restart_window_s']} s, "
                     f"memory {host['memory_limit_mib'] or '-'} MiB, threads {host['max_threads'] or '-'}, "
                     f"files {host['max_open_files'] or '-'}")
    return lines


def cmd_derive(args) -> int:
    from policy.derive import derive
    from policy.regfile import RegistryError, parse_files
    now = datetime.now(timezone.utc)
    try:
        defines = _defines(args.defines)
        expires = _expiry(args.expires, now)
        parsed = parse_files(args.reg, defines=defines, strict=args.strict)
    except RegistryError as exc:
        return _err(f"{exc}")
    except PolicyError as exc:
        return _err(str(exc))
    for diag in parsed.diagnostics:
        print(str(diag), file=sys.stderr)
    _note_root_bus(parsed.hive)
    search = args.driver_path or list(dict.fromkeys(p.resolve().parent for p in args.reg))
    errors: list = []
    try:
        results = derive(parsed.hive, search, serial=args.serial, now=now, expires=expires, errors=errors)
    except PolicyError as exc:
        return _err(str(exc))
    for exc in errors:
        _err(f"{exc}; no policy written for it")
    if not results:
        if errors:
            return _err("no policy written: every driver key has an error (above)")
        return _err(_nothing_found(parsed.hive, args.reg))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _err(f"{args.out}: cannot create the output directory: {exc.strerror}")
    rows, used = [], set()
    for r in results:
        name = policy_file_name(r.entry.key_path)
        stem, n = name[:-5], 2
        while name.casefold() in used:               # two keys that sanitise alike
            name, n = f"{stem}-{n}.json", n + 1
        used.add(name.casefold())
        path = args.out / name
        try:
            write_atomic(path, (json.dumps(r.document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        except OSError as exc:
            return _err(f"{path}: cannot write the policy: {exc.strerror}")
        rows.append((r, path))
    if args.json:
        print(json.dumps([{"key": r.entry.key_path, "name": r.entry.name, "mode": r.entry.mode,
                           "group": r.document["host"]["group"] if r.document["host"] else None,
                           "file": str(p), "warnings": r.warnings} for r, p in rows], indent=2))
    else:
        for r, p in rows:
            for w in r.warnings:
                print(f"warning: {w}", file=sys.stderr)
        print(f"{'DEVICE':7} {'MODE':6} {'GROUP':5}  KEY -> FILE")
        for r, p in rows:
            host = r.document["host"]
            group = "-" if not host or host["group"] is None else str(host["group"])
            flags = "  (NOLOAD: not loaded)" if r.entry.noload else ""
            print(f"{r.entry.name or '-':7} {r.entry.mode:6} {group:5}  {r.entry.key_path} -> {p}{flags}")
            for line in _grants(r.document):
                print(f"{'':21}{line}")
        print(f"{len(rows)} policies written to {args.out}, serial {results[0].document['serial']}; "
              f"{sum(len(r.warnings) for r, _ in rows)} warning(s).  Review, then: drvbox policy sign --key KEY {args.out}/*.json")
        if errors:
            print(f"{len(errors)} driver key(s) NOT derived: see the errors above")
    return 1 if errors else 0


def _note_root_bus(hive) -> None:
    """BSPs (TI's OMAP ones) give HKLM\\Drivers\\BuiltIn itself a Dll: CE's root bus enumerator, which
    loads the keys below it.  drvbox's Device Manager does that job, so the key gets no policy."""
    from policy.drivers import BUILTIN_ROOT
    root = hive.key(BUILTIN_ROOT)
    dll = root.get("Dll") if root is not None else None
    if dll is not None:
        where = f"{dll.location}: " if dll.location else ""
        print(f"note: {where}[{root.path}] \"Dll\" names the root bus driver {dll.data!r}; drvbox's Device Manager "
              "loads the keys below it itself, so the root key gets no policy", file=sys.stderr)


def _nothing_found(hive, files) -> str:
    """Why no driver was found, with the keys that look like drivers but are not where drvbox looks."""
    from policy.drivers import BUILTIN_ROOT
    elsewhere = [k.path for k in hive.keys() if k.get("Dll") is not None and k.get("Prefix") is not None
                 and not k.path.casefold().startswith(BUILTIN_ROOT.casefold() + "\\")]
    msg = (f"no driver keys (keys with a Dll under {BUILTIN_ROOT}) in {', '.join(map(str, files))}; nothing written "
           "(fix: check the files, and -D the names their IF/#if blocks need")
    if elsewhere:
        shown = ", ".join(elsewhere[:5]) + (f" and {len(elsewhere) - 5} more" if len(elsewhere) > 5 else "")
        msg += (f"; keys with a Dll and a Prefix outside BuiltIn ({shown}) are loaded on CE by another driver "
                "or ActivateDevice, not at boot: to run one in drvbox, move it under BuiltIn")
    return msg + ")"


# --- sign / verify / show --------------------------------------------------------------------

def _read_json(path: Path):
    from policy.acceptance import Rejected, read_unverified
    try:
        return read_unverified(path)
    except Rejected as exc:
        raise PolicyError(exc.detail) from None


def cmd_sign(args) -> int:
    from policy.document import validate_document
    from policy.errors import PolicyInvalid
    from policy.signing import decode_payload, key_id, load_private_key, sign
    try:
        key = load_private_key(args.key)
    except PolicyError as exc:
        return _err(str(exc))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in args.files:
        try:
            unverified = _read_json(path)
            envelope = None
            if isinstance(unverified, dict) and "payload" in unverified:
                envelope = unverified
                _, unverified = decode_payload(envelope)
            try:
                validate_document(unverified)
            except PolicyInvalid as exc:
                raise PolicyError(f"not a valid policy at {exc.path}: {exc.problem} "
                                  "(fix: derive it again with `drvbox policy derive`)") from None
            signed = sign(unverified, key, envelope)
            dest = (args.out / path.name) if args.out else path
            write_atomic(dest, (json.dumps(signed, indent=2) + "\n").encode())
        except (PolicyError, OSError) as exc:
            status = _err(f"{path}: {exc}")
            continue
        print(f"signed {dest} ({len(signed['signatures'])} signature(s); key id {key_id(key)[:16]}...)")
    return status


def _registry_entries(args):
    """(hive, {casefolded key path: DriverEntry}, search path) for --registry, or None without it."""
    from policy.drivers import find_drivers
    from policy.regfile import parse_files
    if not args.registry:
        return None
    parsed = parse_files(args.registry, defines=_defines(args.defines))
    search = args.driver_path or list(dict.fromkeys(p.resolve().parent for p in args.registry))
    return parsed.hive, {e.key_path.casefold(): e for e in find_drivers(parsed.hive)}, search


def cmd_verify(args) -> int:
    from policy.acceptance import Rejected, check_here, check_signed, read_unverified
    from policy.regfile import RegistryError
    from policy.signing import TrustStore, envelope_key_ids
    try:
        trust = TrustStore.load(args.trust)
        registry = _registry_entries(args)
    except (PolicyError, RegistryError) as exc:
        return _err(str(exc))
    if not trust.keys:
        print(f"drvbox: warning: trust store {args.trust} holds no *.pub keys; nothing can verify", file=sys.stderr)
    status = 0
    for path in args.files:
        try:
            unverified = read_unverified(path)
            doc = check_signed(unverified, trust)
            if registry is not None:
                hive, entries, search = registry
                entry = entries.get(doc["driver"]["key"].casefold())
                if entry is None:
                    raise Rejected("registry-mismatch", f"no driver key {doc['driver']['key']} in "
                                   f"{', '.join(map(str, args.registry))}")
                check_here(doc, hive, entry, search)
        except Rejected as exc:
            print(f"{path}: REJECTED ({exc.reason}): {exc.detail}")
            status = 1
            continue
        signers = [k for k in envelope_key_ids(unverified) if k in trust.keys]
        names = ", ".join(f"{trust.files[k].name} ({k[:16]}...)" for k in signers)
        print(f"{path}: OK  {doc['driver']['key']} {doc['driver']['name'] or '-'} {doc['driver']['mode']} "
              f"serial {doc['serial']}, signed by {names}")
    return status


def cmd_show(args) -> int:
    from policy.signing import SignatureError, TrustStore, decode_payload, envelope_key_ids, verify_envelope
    try:
        unverified = _read_json(args.file)
        trust = TrustStore.load(args.trust) if args.trust else None
    except PolicyError as exc:
        return _err(str(exc))
    if isinstance(unverified, dict) and "payload" in unverified:
        try:
            _, doc = decode_payload(unverified)
        except SignatureError as exc:
            return _err(f"{args.file}: malformed envelope: {exc.detail}")
        ids = envelope_key_ids(unverified)
        print(f"# {args.file}: signed envelope, {len(ids)} signature(s)")
        for k in ids:
            mark = ""
            if trust is not None:
                mark = f"  trusted ({trust.files[k].name})" if k in trust.keys else "  not in the trust store"
            print(f"#   key id {k}{mark}")
        if trust is not None:
            try:
                verify_envelope(unverified, trust)
                print("#   signature: verifies against the trust store")
            except SignatureError as exc:
                print(f"#   signature: DOES NOT VERIFY ({exc.reason}): {exc.detail}")
        else:
            print("#   (signatures not checked; pass --trust DIR, or use drvbox policy verify)")
    elif isinstance(unverified, dict):
        doc = unverified
        print(f"# {args.file}: UNSIGNED policy document (sign it: drvbox policy sign --key KEY {args.file})")
    else:
        return _err(f"{args.file}: neither a policy document nor a signed envelope")
    print(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))
    return 0
