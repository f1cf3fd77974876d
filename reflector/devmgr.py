"""The Device Manager: loads the registry, accepts policies, loads drivers, serves clients.

Start-up, in order:
  1. read the registry files (or the built-in simulated platform's, signing its policies with a
     development key made on first run);
  2. open the audit log (the chain goes on from the last record);
  3. accept the signed policies: a user-mode driver without a valid one is not loaded, is audited
     ``policy.rejected`` and its device answers ENODEV;
  4. load kernel-mode drivers in-process and user-mode drivers into one host per process group,
     in ``Order``;
  5. serve clients on the Unix socket until stopped.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from datetime import datetime, timezone
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hosts.dispatch import LoadError
from policy import acceptance as acceptance_mod
from policy.audit import FOLDED_EVENTS, AuditError, AuditLog
from policy.derive import derive_one
from policy.document import Policy, format_datetime
from policy.errors import PolicyError
from policy.drivers import find_drivers, group_settings
from policy.modules import ModuleNotFound, resolve_module
from policy.pinning import pin_module
from policy.regfile import parse_files
from reflector import devkeys, paths
from reflector.devices import REJECTED, Device, KernelDevice, UserDevice
from reflector.hostgroup import HostGroup
from reflector.kernel_ops import KernelOps, attach_resources

log = logging.getLogger("drvbox.dm")

SOLO_GROUP_BASE = 0x10000        # groups made for user-mode drivers without UserProcGroup, or split off


@dataclass
class RunConfig:
    state_dir: Path
    socket: Path
    registry: list[Path] = field(default_factory=list)     # empty: the built-in simulated platform
    driver_path: list[Path] = field(default_factory=list)
    policies: Path | None = None
    trust: Path | None = None
    defines: dict[str, str] = field(default_factory=dict)
    sandbox_optional: frozenset[str] = frozenset()          # mechanisms the user accepts missing


def builtin_driver_dir() -> Path:
    return Path(str(resources.files("reflector.drivers")))


class RejectedDevice(Device):
    """A driver that is not loaded -- its policy was refused, or (kernel mode) its module or its
    ``init`` failed: listed, never served, every open answers ENODEV."""

    def __init__(self, entry, module_path, audit, reason: str, mode: str = "user"):
        super().__init__(entry, None, module_path, audit)
        self.reason = reason
        self.mode = mode

    @property
    def state(self) -> str:
        return REJECTED


class DeviceManager:
    def __init__(self, config: RunConfig):
        self.config = config
        self.owner_uid = os.getuid()
        self.devices: dict[str, Device] = {}          # casefolded name -> device
        self.groups: dict[int, HostGroup] = {}
        self.audit: AuditLog | None = None
        self.hive = None
        self.platform = None
        self.supervisor = None
        self._next_solo = SOLO_GROUP_BASE
        self._lock = threading.Lock()
        # Set when the Device Manager must stop on its own (its audit log failed): why, and who
        # to tell (drvbox run's stop event).
        self.fatal: str | None = None
        self.on_fatal = lambda: None

    # -- start-up ----------------------------------------------------------------------------

    def load(self) -> None:
        cfg = self.config
        paths.check_state_dir(cfg.state_dir)
        builtin = not cfg.registry
        search_path = list(cfg.driver_path) + ([builtin_driver_dir()] if builtin or not cfg.driver_path else [])
        registry = cfg.registry or [builtin_driver_dir() / "platform.reg"]
        parsed = parse_files(registry, defines=cfg.defines)
        for d in parsed.diagnostics:
            log.warning("%s", d)
        self.hive = parsed.hive
        try:
            audit_key = devkeys.ensure_key(cfg.state_dir, "audit")
        except OSError as exc:
            # Nothing runs unaudited: without its key there is no audit log, so no Device Manager.
            raise AuditError(f"cannot make or read the audit signing key ({exc.strerror or exc}); the state "
                             f"directory must be writable by the Device Manager (or choose another with "
                             f"--state-dir)", path=Path(exc.filename or cfg.state_dir)) from None
        # Denials a client or a driver can repeat at will are folded past a burst a second, so
        # that no one can fill the disk (and stop us) by asking again and again.
        self.audit = AuditLog(paths.audit_log_path(cfg.state_dir), signing_key=audit_key, fold=FOLDED_EVENTS)
        self.audit.on_failure = self._audit_failed
        if builtin:
            policies, trust = devkeys.builtin_policies(cfg.state_dir, self.hive, search_path)
        else:
            policies, trust = cfg.policies, cfg.trust
        key_errors: list = []
        entries = [e for e in find_drivers(self.hive, errors=key_errors) if not e.noload]
        for err in key_errors:
            # A driver key we cannot read is not loaded -- never loaded with defaults wider than
            # what its file meant -- and the others go on.
            log.error("%s", err)
            self.audit.record("policy.rejected", detail={"reason": "registry", "detail": str(err),
                                                         "key": getattr(err, "key_path", None)})
        needs_policy = [e for e in entries if e.mode == "user"]
        if needs_policy and (policies is None or trust is None):
            raise SystemExit("drvbox run: user-mode drivers need signed policies: give --policies DIR and --trust DIR "
                             "(make them with `drvbox policy derive`, `drvbox keys new` and `drvbox policy sign`)")
        accepted = acceptance_mod.accept(self.hive, needs_policy, policies, trust, cfg.state_dir, search_path) \
            if needs_policy else acceptance_mod.Acceptance({}, {})
        self._make_platform()
        self.kernel_ops = KernelOps(self)
        issued = format_datetime(datetime.now(timezone.utc))

        pending_groups: dict[int, list[UserDevice]] = {}
        for entry in entries:
            if entry.name is None:
                log.warning("%s: no Prefix, so no device name; skipped", entry.key_path)
                continue
            if entry.name.casefold() in self.devices:
                log.error("%s: device name %s is already taken; skipped", entry.key_path, entry.name)
                continue
            try:
                module_ref = resolve_module(entry.dll, search_path)
                module = str(module_ref.path)
            except ModuleNotFound as exc:
                log.error("%s", exc)
                self.audit.record("policy.rejected", device=entry.name, driver=entry.dll, group=entry.group,
                                  detail={"reason": "module-missing", "detail": str(exc)})
                self.devices[entry.name.casefold()] = RejectedDevice(entry, "", self.audit, str(exc))
                continue
            if entry.mode == "kernel":
                # Trusted by configuration: its policy is derived here, from our own registry, one
                # driver at a time so that one bad key does not stop the others.
                try:
                    document = derive_one(self.hive, entry, search_path, 1, issued).document
                except PolicyError as exc:
                    log.error("%s: %s", entry.key_path, exc)
                    self.devices[entry.name.casefold()] = RejectedDevice(entry, module, self.audit, str(exc))
                    continue
                try:
                    self.devices[entry.name.casefold()] = self._load_kernel(entry, module, document)
                except LoadError as exc:
                    # In our own process, so nothing to restart: the device is listed as not
                    # loaded, answers ENODEV, and the other drivers load on.
                    log.error("%s (%s): %s", entry.name, entry.key_path, exc.message)
                    self.audit.record("driver.failed", device=entry.name, driver=entry.dll,
                                      detail={"mode": "kernel", "errno": errno.errorcode.get(exc.errno, exc.errno),
                                              "detail": exc.message, "key": entry.key_path})
                    self.devices[entry.name.casefold()] = RejectedDevice(entry, module, self.audit, "load-failed",
                                                                         mode="kernel")
                continue
            policy = accepted.accepted.get(entry.key_path)
            if policy is None:
                rej = accepted.rejected.get(entry.key_path)
                reason = rej.reason if rej else "missing"
                detail = rej.detail if rej else "no policy names this key"
                self.audit.record("policy.rejected", device=entry.name, driver=entry.dll, group=entry.group,
                                  detail={"reason": reason, "detail": detail, "key": entry.key_path})
                log.error("%s (%s): policy rejected: %s: %s", entry.name, entry.key_path, reason, detail)
                self.devices[entry.name.casefold()] = RejectedDevice(entry, module, self.audit, reason)
                continue
            # Every host of this driver, now and after restarts, loads a checked private copy of
            # the module the policy names: replacing the file on the driver path changes nothing.
            try:
                module = str(pin_module(module_ref, policy.module_sha256, cfg.state_dir).path)
            except PolicyError as exc:
                self.audit.record("policy.rejected", device=entry.name, driver=entry.dll, group=entry.group,
                                  detail={"reason": "module-mismatch", "detail": str(exc), "key": entry.key_path})
                log.error("%s (%s): %s", entry.name, entry.key_path, exc)
                self.devices[entry.name.casefold()] = RejectedDevice(entry, module, self.audit, "module-mismatch")
                continue
            self.audit.record("policy.loaded", device=entry.name, driver=entry.dll, group=entry.group,
                              detail={"serial": policy.serial, "key": entry.key_path, "module": module})
            device = UserDevice(entry, policy, module, self.audit)
            self.devices[entry.name.casefold()] = device
            gid = entry.group if entry.group is not None else self._solo_id()
            pending_groups.setdefault(gid, []).append(device)

        for gid, devices in pending_groups.items():
            self.groups[gid] = self._make_group(gid, devices, solo=devices[0].entry.group is None)

    def _solo_id(self) -> int:
        with self._lock:
            self._next_solo += 1
            return self._next_solo

    def _make_group(self, gid: int, devices: list[UserDevice], solo: bool, settings=None) -> HostGroup:
        if settings is None:
            settings = group_settings(self.hive, devices[0].entry.group if devices[0].entry.group is not None else gid)
        return HostGroup(gid, settings, devices, hive=self.hive, audit=self.audit, supervisor=self.supervisor,
                         kernel_ops=self.kernel_ops, sandbox_options={"optional": self.config.sandbox_optional},
                         on_split=self._split, solo=solo)

    def _split(self, group: HostGroup, device: UserDevice) -> None:
        """Called by a group whose shared host keeps crashing in one driver: give it a host of its own."""
        gid = self._solo_id()
        solo = self._make_group(gid, [device], solo=True, settings=group.settings)
        with self._lock:
            self.groups[gid] = solo
        threading.Thread(target=self._start_group, args=(solo,), daemon=True).start()

    def _start_group(self, group: HostGroup) -> None:
        group.launch()

    def _load_kernel(self, entry, module: str, document: dict) -> Device:
        from hosts.dispatch import LoadedDriver
        from reflector.kernel_ops import InProcessKernel
        policy = Policy.trusted(document)
        key = self.hive.key(entry.key_path)
        registry = {v.name: v.data for v in key.values()} if key is not None else {}
        device = KernelDevice(entry, policy, module, self.audit, loaded=None)
        kernel = InProcessKernel(self.kernel_ops, device)
        device.loaded = LoadedDriver(entry.name, module, registry, kernel,
                                     lambda level, msg: log.log(level, "%s: %s", entry.name, msg))
        self.audit.record("policy.loaded", device=entry.name, driver=entry.dll, detail={"mode": "kernel"})
        return device

    def _make_platform(self) -> None:
        try:
            from reflector.simhw.platform import Platform
        except ImportError:
            return
        if self.hive.key(r"HKEY_LOCAL_MACHINE\Platform\Devices") is not None:
            self.platform = Platform.from_registry(self.hive)
            attach_resources(self.platform)      # who holds what: checked on every KCALL

    def start(self) -> None:
        """Start every process group's host, in the order of their first driver."""
        from sandbox.notify import SyscallSupervisor
        self.supervisor = SyscallSupervisor()
        self.supervisor.start()
        for group in self.groups.values():
            group.supervisor = self.supervisor
        for group in sorted(self.groups.values(), key=lambda g: min(d.entry.order for d in g.devices)):
            self._start_group(group)

    # -- clients -----------------------------------------------------------------------------

    def device(self, name: str) -> Device | None:
        return self.devices.get(name.casefold())

    def describe(self) -> dict:
        devices = []
        for d in self.devices.values():
            group = getattr(d, "group", None)
            devices.append({"name": d.name, "key": d.key_path, "driver": d.entry.dll, "mode": d.mode,
                            "group": group.gid if group is not None else d.entry.group,
                            "state": d.state, "restarts": d.restarts})
        with self._lock:
            groups = list(self.groups.values())
        return {"devices": devices, "hosts": [g.describe() for g in groups if g.devices]}

    def restart(self, name: str) -> None:
        device = self.device(name)
        if device is None:
            raise OSError(errno.ENODEV, f"no device {name!r}")
        group = getattr(device, "group", None)
        if group is None:
            raise OSError(errno.EINVAL, f"{name} is not a user-mode device with a host; nothing to restart")
        group.restart_now()

    def hw_command(self, command: dict) -> dict:
        if self.platform is None:
            raise OSError(errno.ENODEV, "no simulated hardware on this platform")
        from reflector.hwcommands import run_hw_command
        answer = run_hw_command(self.platform, command)
        resources = getattr(self.platform, "resources", None)
        if command.get("verb") == "ls" and resources is not None:
            # Who holds what: device claims, hooked interrupts, mapped regions, DMA buffers.
            answer["held"] = resources.describe()
        return answer

    # -- the end -------------------------------------------------------------------------------

    def _audit_failed(self, exc: OSError) -> None:
        """The audit log refused a write or an fsync.  Decided: the Device Manager stops (its
        hosts with it) rather than go on running drivers whose denials, crashes and violations
        nobody could read afterwards -- fail closed, as everywhere else.  Restart it once the log
        can be written; the chain goes on from what reached the disk."""
        where = self.audit.path if self.audit is not None else "the audit log"
        self.fatal = (f"the audit log {where} cannot be written ({exc.strerror or exc}): stopping, since drvbox "
                      f"does not run drivers it cannot audit.  Free space on its filesystem or make it writable, "
                      f"then start drvbox run again (the chain goes on; `drvbox audit verify` checks it)")
        log.critical("%s", self.fatal)
        self.on_fatal()

    def stop(self) -> None:
        # Each part is stopped even if another fails (an audit log that cannot be written makes
        # every record raise): no host may outlive a Device Manager that is going away.
        for d in self.devices.values():
            if isinstance(d, KernelDevice):
                _stop_part(d.stop, d.name)
        with self._lock:
            groups = list(self.groups.values())
        for g in groups:
            _stop_part(g.stop, f"group {g.gid}")
        if self.supervisor is not None:
            _stop_part(self.supervisor.stop, "the system-call supervisor")
        if self.audit is not None:
            _stop_part(self.audit.close, f"the audit log {self.audit.path}")


def _stop_part(stop, what: str) -> None:
    try:
        stop()
    except Exception as exc:
        log.error("stopping %s: %s", what, exc)
