"""Exit statuses of a host, one per reason, so the Reflector can audit why a host ended.

Above the range of shell conventions and of the statuses ``sandbox`` uses for a failed
confinement step, so the two cannot be confused.
"""

import enum


class HostExit(enum.IntEnum):
    OK = 0                # EOF on the channel, or SHUTDOWN done
    BAD_ARGS = 80         # run() got fds or arguments it cannot use
    BAD_FRAME = 81        # a frame ``wire.decode`` refused, or one a host never receives
    UNEXPECTED_FDS = 82   # file descriptors on a frame other than KREPLY (closed unread)
    CHANNEL_ERROR = 83    # recvmsg on the channel failed
    ARENA = 84            # the arena could not be mapped
