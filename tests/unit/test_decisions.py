"""policy.decisions: an allowed/denied pair at every edge of every rule."""

from __future__ import annotations

import copy
import grp
import json
import os
import pwd
from pathlib import Path

import pytest

from policy.decisions import (Decision, may_alloc_dma, may_device_ioctl, may_interrupt, may_ioctl, may_map,
                              may_open, may_open_device, may_port, may_syscall, may_transfer)
from policy.document import Policy

EXAMPLE = json.loads((Path(__file__).parents[1] / "data" / "policy" / "example-policy.json").read_text())
P = Policy.trusted(EXAMPLE)
MEM0, MEM1 = 0x48004000, 0x48006000          # rw 0x1000, r 0x100
PORT0, PORT1 = 0x3F8, 0x400                  # rw 8, r 4


def policy(**changes) -> Policy:
    d = copy.deepcopy(EXAMPLE)
    for k, v in changes.items():
        if "__" in k:
            section, field = k.split("__")
            d[section][field] = v
        else:
            d[k] = v
    return Policy.trusted(d)


def allowed(decision: Decision) -> bool:
    assert isinstance(decision, Decision) and decision.reason and decision.op
    return bool(decision)


def test_decision_is_truthy_only_when_allowed():
    assert Decision(True, "x", "r") and not Decision(False, "x", "r")


# --- memory ----------------------------------------------------------------------------------

def test_map_inside_window_allowed_and_one_byte_past_denied():
    assert allowed(may_map(P, MEM0, 0x1000))
    assert allowed(may_map(P, MEM0 + 0xFFF, 1))
    assert not allowed(may_map(P, MEM0, 0x1001))
    assert not allowed(may_map(P, MEM0 + 0x1000, 1))
    assert not allowed(may_map(P, MEM0 - 1, 2))
    assert not allowed(may_map(P, MEM0 - 1, 1))


def test_map_across_two_windows_is_denied():
    # a range spanning windows is not "inside one window", even if both are granted
    assert not allowed(may_map(P, MEM0, MEM1 - MEM0 + 1))


def test_map_access_read_only_window():
    assert allowed(may_map(P, MEM1, 0x100, "r"))
    d = may_map(P, MEM1, 0x100, "rw")
    assert not d and "grants 'r'" in d.reason
    assert not allowed(may_map(P, MEM1, 0x101, "r"))


@pytest.mark.parametrize("args", [(MEM0, 0), (MEM0, -1), (-1, 2), (True, 1), (MEM0, 1.0), ("1", 1),
                                  (2 ** 64 - 1, 2), (MEM0, 1, "x"), (MEM0, 1, "w")])
def test_map_malformed_requests_are_denied_not_raised(args):
    assert not allowed(may_map(P, *args))


# --- ports -----------------------------------------------------------------------------------

@pytest.mark.parametrize("port, width", [(PORT0, 1), (PORT0, 4), (PORT0 + 4, 4), (PORT0 + 6, 2), (PORT0 + 7, 1)])
def test_port_access_inside_allowed(port, width):
    assert allowed(may_port(P, port, width, "rw"))


@pytest.mark.parametrize("port, width", [(PORT0 + 5, 4), (PORT0 + 7, 2), (PORT0 + 8, 1), (PORT0 - 1, 1), (PORT0 - 1, 2)])
def test_port_access_straddling_or_outside_denied(port, width):
    assert not allowed(may_port(P, port, width, "rw"))


def test_port_read_only_window():
    assert allowed(may_port(P, PORT1, 4, "r"))
    assert not allowed(may_port(P, PORT1, 4, "w"))
    assert not allowed(may_port(P, PORT1, 1, "rw"))


@pytest.mark.parametrize("port, width, access", [(PORT0, 3, "r"), (PORT0, 8, "r"), (PORT0, True, "r"),
                                                 (0x10000, 1, "r"), (-1, 1, "r"), (PORT0, 1, "x")])
def test_port_malformed_denied(port, width, access):
    assert not allowed(may_port(P, port, width, access))


# --- interrupts, DMA -------------------------------------------------------------------------

def test_interrupts_irq_and_sysintr_allowed_others_denied():
    assert allowed(may_interrupt(P, 4)) and allowed(may_interrupt(P, 17))
    assert not allowed(may_interrupt(P, 5)) and not allowed(may_interrupt(P, 3))
    assert not allowed(may_interrupt(P, -1)) and not allowed(may_interrupt(P, "4"))


def test_dma_up_to_quota_allowed_one_byte_more_denied():
    assert allowed(may_alloc_dma(P, 8192, 0))
    assert allowed(may_alloc_dma(P, 1, 8191))
    assert not allowed(may_alloc_dma(P, 8193, 0))
    assert not allowed(may_alloc_dma(P, 1, 8192))
    assert not allowed(may_alloc_dma(P, 0, 0))
    assert not allowed(may_alloc_dma(P, 1, -1))


def test_dma_zero_quota_denies_everything():
    assert not allowed(may_alloc_dma(policy(resources__dma_quota=0), 1, 0))


# --- ioctl and transfers ---------------------------------------------------------------------

@pytest.mark.parametrize("code, ok", [(0x00220004, True), (0x00220003, False), (0x00220005, False),
                                      (0x00220010, True), (0x0022001F, True), (0x0022000F, False), (0x00220020, False)])
def test_ioctl_codes_at_range_edges(code, ok):
    assert allowed(may_ioctl(P, code, 0, 0)) is ok


def test_ioctl_sizes_at_max_io_size():
    assert allowed(may_ioctl(P, 0x00220004, 4096, 4096))
    assert not allowed(may_ioctl(P, 0x00220004, 4097, 0))
    assert not allowed(may_ioctl(P, 0x00220004, 0, 4097))
    assert not allowed(may_ioctl(P, 0x00220004, -1, 0))
    assert not allowed(may_ioctl(P, 2 ** 32, 0, 0))


def test_ioctl_all_codes_only_when_policy_says_so():
    everything = policy(io__ioctls={"all": True})
    d = may_ioctl(everything, 0xDEADBEEF, 0, 0)
    assert d and "every code" in d.reason
    assert not allowed(may_ioctl(policy(io__ioctls={"ranges": []}), 0x00220004, 0, 0))


def test_transfer_sizes():
    assert allowed(may_transfer(P, "read", 4096)) and allowed(may_transfer(P, "write", 0))
    assert not allowed(may_transfer(P, "read", 4097)) and not allowed(may_transfer(P, "write", 4097))
    assert not allowed(may_transfer(P, "seek", 1)) and not allowed(may_transfer(P, "read", -1))


# --- device nodes ----------------------------------------------------------------------------

def test_device_nodes_modes():
    assert allowed(may_open_device(P, "/dev/ttyS0", "rw")) and allowed(may_open_device(P, "/dev/ttyS0", "r"))
    assert allowed(may_open_device(P, "/dev/urandom", "r"))
    assert not allowed(may_open_device(P, "/dev/urandom", "rw"))
    assert not allowed(may_open_device(P, "/dev/ttyS1", "r"))
    assert not allowed(may_open_device(P, "/dev/ttyS0", "w"))


@pytest.mark.parametrize("path, ok", [("/dev/./ttyS0", True), ("//dev//ttyS0", True), ("/dev/x/../ttyS0", True),
                                      ("dev/ttyS0", False), ("ttyS0", False), ("/dev/ttyS0/..", False),
                                      ("/dev/ttyS0\0", False), (b"/dev/ttyS0", False)])
def test_device_paths_are_normalised_and_relative_refused(path, ok):
    assert allowed(may_open_device(P, path, "r")) is ok


def test_device_ioctls():
    assert allowed(may_device_ioctl(P, "/dev/ttyS0", 0x5401))
    assert allowed(may_device_ioctl(P, "/dev/ttyS0", 0x5410)) and allowed(may_device_ioctl(P, "/dev/ttyS0", 0x541A))
    assert not allowed(may_device_ioctl(P, "/dev/ttyS0", 0x5402))
    assert not allowed(may_device_ioctl(P, "/dev/ttyS0", 0x541B))
    assert not allowed(may_device_ioctl(P, "/dev/urandom", 0x5401))      # a node without ioctls: none
    assert not allowed(may_device_ioctl(P, "/dev/ttyS1", 0x5401))


def test_syscalls_only_the_added_ones():
    assert allowed(may_syscall(P, "clock_nanosleep"))
    assert not allowed(may_syscall(P, "ptrace")) and not allowed(may_syscall(P, None))


# --- clients ---------------------------------------------------------------------------------

def test_open_everyone_when_no_lists():
    assert allowed(may_open(P, 1234, [1234], owner_uid=0))


def test_open_trusted_only_root_or_owner():
    t = policy(clients={"users": None, "groups": None, "trusted_only": True})
    assert allowed(may_open(t, 0, [0], owner_uid=1000))
    assert allowed(may_open(t, 1000, [1000], owner_uid=1000))
    d = may_open(t, 1001, [1001], owner_uid=1000)
    assert not d and "TRUSTEDCALLERONLY" in d.reason


def test_open_by_numeric_user_and_group():
    u = policy(clients={"users": ["1234"], "groups": None, "trusted_only": False})
    assert allowed(may_open(u, 1234, [5], owner_uid=0))
    assert not allowed(may_open(u, 1235, [5], owner_uid=0))
    g = policy(clients={"users": None, "groups": ["77"], "trusted_only": False})
    assert allowed(may_open(g, 1, [5, 77], owner_uid=0))
    assert not allowed(may_open(g, 1, [5, 78], owner_uid=0))


def test_open_by_name_resolved_with_pwd_and_grp():
    me = pwd.getpwuid(os.getuid()).pw_name
    my_group = grp.getgrgid(os.getgid()).gr_name
    u = policy(clients={"users": [me], "groups": None, "trusted_only": False})
    assert allowed(may_open(u, os.getuid(), [], owner_uid=0))
    assert not allowed(may_open(u, os.getuid() + 1, [], owner_uid=0))
    g = policy(clients={"users": None, "groups": [my_group], "trusted_only": False})
    assert allowed(may_open(g, 4321, [os.getgid()], owner_uid=0))
    assert not allowed(may_open(g, 4321, [os.getgid() + 1], owner_uid=0))


def test_open_unknown_name_matches_nobody_and_empty_lists_admit_nobody():
    u = policy(clients={"users": ["no_such_user_drvbox"], "groups": [], "trusted_only": False})
    assert not allowed(may_open(u, 0, [0], owner_uid=0))
    nobody = policy(clients={"users": [], "groups": [], "trusted_only": False})
    assert not allowed(may_open(nobody, 0, [0], owner_uid=0))


def test_open_malformed_credentials_denied():
    assert not allowed(may_open(P, -1, [], owner_uid=0))
    assert not allowed(may_open(P, 1, None, owner_uid=0))


# --- properties: the answer agrees with a brute-force model ----------------------------------

from hypothesis import given, strategies as st  # noqa: E402


def _model_inside(windows, start, length, access):
    return any(w.base <= start and start + length <= w.base + w.length and (access == "r" or w.access == "rw")
               for w in windows)


@given(st.integers(MEM0 - 0x20, MEM1 + 0x120), st.integers(1, 0x2200), st.sampled_from(["r", "rw"]))
def test_map_agrees_with_model(phys, length, access):
    assert bool(may_map(P, phys, length, access)) == _model_inside(P.memory_windows, phys, length, access)


@given(st.integers(PORT0 - 8, PORT1 + 8), st.sampled_from([1, 2, 4]), st.sampled_from(["r", "w", "rw"]))
def test_port_agrees_with_model(port, width, access):
    want = _model_inside(P.port_windows, port, width, "r" if access == "r" else "rw")
    assert bool(may_port(P, port, width, access)) == want


@given(st.integers(0, 0xFFFFFFFF))
def test_ioctl_agrees_with_model(code):
    assert bool(may_ioctl(P, code, 0, 0)) == any(lo <= code <= hi for lo, hi in P.ioctl_ranges)


# --- the per-request allows format their reasons only when read ------------------------------

def test_ioctl_and_transfer_allow_reasons_read_the_same_when_formatted_lazily():
    assert may_ioctl(P, 0x00220004, 0, 0).reason.startswith("code 0x00220004 is in IoctlAllow 0x")
    assert may_ioctl(policy(io__ioctls={"all": True}), 0xDEADBEEF, 0, 0).reason == \
        "code 0xDEADBEEF: the policy allows every code (no IoctlAllow)"
    d = may_transfer(P, "read", 4096)
    assert d.reason == f"read of 4096 bytes is within MaxIoSize {P.max_io_size}"
    assert d.reason == d.reason and d.allowed is True and d.op == "read"
    assert "within MaxIoSize" in repr(d)


def test_decision_is_immutable_and_denials_carry_formatted_reasons():
    d = may_transfer(P, "read", P.max_io_size + 1)
    assert not d and d.reason == f"read of {P.max_io_size + 1} bytes exceeds MaxIoSize {P.max_io_size}"
    with pytest.raises(AttributeError):
        d.allowed = True
