"""The control socket between ``spawn`` and its launcher: one JSON object per SEQPACKET message.

Used only while a sandbox starts (the plan goes in; maps requests, the inner pid, a failed step
or the final report come out, the last with the seccomp listener fd).  Both ends close it before
the target runs.  SOCK_SEQPACKET keeps message boundaries; anything truncated is an error.
"""

from __future__ import annotations

import array
import json

# _socket, not socket: the launcher imports this, and socket (with enum and selectors) costs
# several milliseconds of every host start.  Parent-side socket.socket objects are _socket ones.
import _socket as socket

MAX_MESSAGE = 192 * 1024   # under the default socket buffer, so one send never blocks half-way
MAX_FDS = 1


class ControlError(Exception):
    pass


def send(sock, message: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE} "
                           "(is target_arg too large? pass bulk data through a passed fd)")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def recv(sock) -> tuple[dict | None, list[int]]:
    """One message and the fds that came with it; ``(None, [])`` at end of stream."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
            raise ControlError("truncated control message")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ControlError("control message is not an object")
    except (ValueError, ControlError) as exc:
        for fd in fds:
            _close_quietly(fd)
        raise ControlError(f"malformed control message: {exc}") from None
    return message, fds


def _close_quietly(fd: int) -> None:
    import os
    try:
        os.close(fd)
    except OSError:
        pass
