"""The Device Manager's closed set of client operations: one handler each, nothing else."""

from hosts.main import Host
from hosts.wire import Op as HostOp
from reflector import clientwire as cw
from reflector.server import _Session


def test_every_client_request_has_exactly_one_handler_and_reply_has_none():
    assert set(_Session._HANDLERS) == set(cw.BODIES)
    assert cw.Op.REPLY not in _Session._HANDLERS
    assert len(set(_Session._HANDLERS.values())) == len(_Session._HANDLERS)


def test_host_driver_calls_cover_the_driver_operations_only():
    driver_ops = {HostOp.OPEN, HostOp.CLOSE, HostOp.PRE_CLOSE, HostOp.POWER, HostOp.SEEK,
                  HostOp.READ, HostOp.WRITE, HostOp.IOCTL}
    assert set(Host._CALLS) == driver_ops
    # Operations the host handles itself, or that hosts send, never reach a driver call.
    for op in (HostOp.LOAD, HostOp.UNLOAD, HostOp.SHUTDOWN, HostOp.KREPLY, HostOp.REPLY, HostOp.KCALL):
        assert op not in Host._CALLS
