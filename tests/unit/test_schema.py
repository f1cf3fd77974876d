"""schemas/policy.schema.json and policy.document: what a valid policy is, and the Policy type."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from policy.document import Policy, validate_document
from policy.errors import PolicyInvalid

EXAMPLE = json.loads((Path(__file__).parents[1] / "data" / "policy" / "example-policy.json").read_text())

HOST = {"group": 2, "key": "HKEY_LOCAL_MACHINE\\Drivers\\ProcGroup_0002", "proc_name": "udevice.exe",
        "timeout_ms": 20000, "restart_limit": 5, "restart_window_s": 60, "memory_limit_mib": 64,
        "max_threads": None, "max_open_files": None}


def doc(**changes):
    """EXAMPLE with ``changes`` applied: keys are dotted paths, a value of ... deletes."""
    d = copy.deepcopy(EXAMPLE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = d
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is ...:
            del target[last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return d


def invalid(d) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as info:
        validate_document(d)
    return info.value


def test_example_is_valid():
    validate_document(EXAMPLE)


def test_user_mode_with_host_is_valid_and_without_is_not():
    validate_document(doc(driver__mode="user", host=HOST))
    assert invalid(doc(driver__mode="user")).path == "$.host"


def test_kernel_mode_with_host_is_invalid():
    assert invalid(doc(host=HOST)).path == "$.host"


def test_expires_is_optional_but_must_be_a_date_time():
    validate_document(doc(expires="2030-01-01T00:00:00+02:00"))
    for bad in ("2030-01-01", "tomorrow", "2030-01-01T00:00:00", "2030-13-01T00:00:00Z"):
        e = invalid(doc(expires=bad))
        assert e.path == "$.expires", bad


@pytest.mark.parametrize("where", ["", "driver", "driver__module", "resources", "resources__memory__0",
                                   "resources__ports__0", "resources__device_nodes__0", "io", "io__ioctls", "clients"])
def test_unknown_fields_are_refused_everywhere(where):
    d = doc()
    target = d
    for p in filter(None, where.split("__")):
        target = target[int(p)] if p.isdigit() else target[p]
    target["surprise"] = 1
    assert "surprise" in invalid(d).problem


@pytest.mark.parametrize("field", ["schema", "serial", "issued", "driver", "host", "resources", "io", "clients",
                                   "syscalls"])
def test_required_fields(field):
    assert field in invalid(doc(**{field: ...})).problem


@pytest.mark.parametrize("change, path", [
    ({"serial": -1}, "$.serial"),
    ({"serial": 2 ** 53}, "$.serial"),
    ({"serial": "1"}, "$.serial"),
    ({"schema": "drvbox.policy/2"}, "$.schema"),
    ({"driver__name": "COM10:"}, "$.driver.name"),
    ({"driver__name": "COM1"}, "$.driver.name"),
    ({"driver__mode": "both"}, "$.driver.mode"),
    ({"driver__flags": 2 ** 32}, "$.driver.flags"),
    ({"driver__dll": "../x.dll"}, "$.driver.dll"),
    ({"driver__registry_sha256": "ABCD"}, "$.driver.registry_sha256"),
    ({"driver__module__sha256": "0" * 63}, "$.driver.module.sha256"),
    ({"driver__key": "Drivers\\BuiltIn\\X"}, "$.driver.key"),
    ({"resources__memory__0__length": 0}, "$.resources.memory[0].length"),
    ({"resources__memory__0__access": "w"}, "$.resources.memory[0].access"),
    ({"resources__ports__0__base": 0x10000}, "$.resources.ports[0].base"),
    ({"resources__irqs": [4, 4]}, "$.resources.irqs"),
    ({"resources__dma_quota": -1}, "$.resources.dma_quota"),
    ({"resources__register_access": "direct"}, "$.resources.register_access"),
    ({"resources__device_nodes__0__path": "dev/ttyS0"}, "$.resources.device_nodes[0].path"),
    ({"io__max_io_size": 2 ** 30 + 1}, "$.io.max_io_size"),
    ({"io__ioctls": {"all": False}}, "$.io.ioctls.all"),
    ({"io__ioctls": {"ranges": [[1]]}}, "$.io.ioctls.ranges[0]"),
    ({"clients__users": ["bad name"]}, "$.clients.users[0]"),
    ({"clients__trusted_only": 1}, "$.clients.trusted_only"),
    ({"syscalls": ["Open"]}, "$.syscalls[0]"),
])
def test_out_of_range_values_name_their_path(change, path):
    assert invalid(doc(**change)).path == path


@pytest.mark.parametrize("change, path, words", [
    ({"resources__memory__1__base": 1207975936 + 4095}, "$.resources.memory", "overlaps"),
    ({"resources__memory__0__base": 2 ** 64 - 4096, "resources__memory__0__length": 4097}, "$.resources.memory[0]", "runs past"),
    ({"resources__ports__0__base": 0xFFFC}, "$.resources.ports[0]", "runs past"),
    ({"resources__ports__1__base": 1020}, "$.resources.ports", "overlaps"),
    ({"io__ioctls": {"ranges": [[5, 4]]}}, "$.io.ioctls.ranges[0]", "upside down"),
    ({"resources__device_nodes__0__ioctls": [[9, 1]]}, "$.resources.device_nodes[0].ioctls[0]", "upside down"),
    ({"resources__device_nodes__0__path": "/dev/../etc/passwd"}, "$.resources.device_nodes[0].path", "normalised"),
    ({"resources__device_nodes__0__path": "//dev/ttyS0"}, "$.resources.device_nodes[0].path", "normalised"),
    ({"resources__device_nodes__1__path": "/dev/ttyS0"}, "$.resources.device_nodes[1].path", "twice"),
])
def test_rules_the_schema_cannot_say(change, path, words):
    e = invalid(doc(**change))
    assert e.path.startswith(path) and words in e.problem


def test_windows_that_touch_do_not_overlap():
    validate_document(doc(resources__memory__1__base=1207975936 + 4096))


# --- the Policy type -------------------------------------------------------------------------

def test_policy_has_no_public_constructor():
    with pytest.raises(TypeError, match="no public constructor"):
        Policy(EXAMPLE)


def test_trusted_builds_a_kernel_mode_policy_with_typed_fields():
    p = Policy.trusted(EXAMPLE)
    assert p.key_path.endswith("Serial") and p.device == "COM1:" and p.mode == "kernel" and p.group is None
    assert p.memory_windows[0] == (1207975936, 4096, "rw") and p.memory_windows[0].end == 1207975936 + 4096
    assert p.irqs == frozenset({4, 17})
    assert p.ioctl_ranges == ((2228228, 2228228), (2228240, 2228255))
    assert p.device_nodes[0].ioctls == ((21505, 21505), (21520, 21530)) and p.device_nodes[1].ioctls == ()
    assert p.allow_users is None and p.limits is None and p.expires is None
    assert p.syscalls == ("clock_nanosleep",)


def test_trusted_refuses_user_mode_and_invalid_documents():
    with pytest.raises(PolicyInvalid, match="kernel-mode drivers only"):
        Policy.trusted(doc(driver__mode="user", host=HOST))
    with pytest.raises(PolicyInvalid):
        Policy.trusted(doc(serial=-1))


def test_policy_is_immutable_and_detached_from_the_dict():
    d = doc()
    p = Policy.trusted(d)
    with pytest.raises(AttributeError):
        p.dma_quota = 1 << 30
    with pytest.raises(TypeError):
        p.document["serial"] = 1
    with pytest.raises(TypeError):
        p.document["resources"]["memory"][0]["length"] = 1
    d["resources"]["dma_quota"] = 1 << 30
    assert p.dma_quota == 8192 and p.document["resources"]["dma_quota"] == 8192


def test_all_ioctls_is_explicit():
    assert Policy.trusted(doc(io__ioctls={"all": True})).ioctl_ranges is None
    assert Policy.trusted(doc(io__ioctls={"ranges": []})).ioctl_ranges == ()


def test_schemas_are_valid_2020_12():
    from jsonschema import Draft202012Validator
    import schemas
    for name in ("policy.schema.json", "signed-policy.schema.json"):
        Draft202012Validator.check_schema(schemas.load(name))


def test_as_dict_round_trips_to_the_document():
    p = Policy.trusted(EXAMPLE)
    d = p.as_dict()
    assert d == EXAMPLE and json.loads(json.dumps(d)) == EXAMPLE
    d["serial"] = 0
    assert p.serial == EXAMPLE["serial"]
