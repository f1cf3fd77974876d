"""The source text of the hostile driver the adversarial tests write into ``tmp_path``.

It is a string, not a module of this repository: drvbox runs drivers that are *not* in this
repository, so the tests write this text next to their registry at run time and point the
Device Manager's driver path there.

One IOCTL, ``ATTACK``, takes a JSON request ``{"attack": name, "arg": ...}`` and performs exactly
one attack.  It answers in the first 16 bytes of the output buffer: ``<IiQ`` = ``SENTINEL``, the
errno the attack got back (0: the attack *worked*) and a value (a count, an fd, a driver id).
The sentinel proves the answer came from the attack code and not from an empty buffer; the
errno says *how* it was refused, and the test pairs it with the audit record that names the
layer (``syscall.denied`` for the seccomp supervisor, ``policy.denied`` for the Reflector).
"""

SENTINEL = 0xD7B0C5E1
ATTACK = 0x00220040
ECHO = 0x00220000

SOURCE = r'''
import ctypes
import errno
import json
import os
import socket
import stat
import struct
import sys
import threading
import time

from hosts import DriverError, StreamDriver

SENTINEL = %(sentinel)d
ATTACK = %(attack)d
ECHO = %(echo)d

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PARKED = {}


def sys_call(nr, *args):
    """One raw system call: 0 or its errno (never raises)."""
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno() if r == -1 else 0


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def channel_fd():
    for fd in range(3, 256):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            continue
    raise RuntimeError("no channel socket")


def current_request():
    f = sys._getframe()
    while f is not None:
        c = f.f_locals.get("frame")
        if c is not None and hasattr(c, "req_id") and hasattr(c, "op"):
            return c
        f = f.f_back
    raise RuntimeError("no request frame on the stack")


def open_errno(path, flags):
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        return exc.errno
    os.close(fd)
    return 0


def a_read_shadow(ctx, arg):
    return open_errno("/etc/shadow", os.O_RDONLY), 0


def a_list_root(ctx, arg):
    """value: how many entries /root shows (the view may hold an empty mount point)."""
    try:
        return 0, len(os.listdir("/root"))
    except OSError as exc:
        return exc.errno, 0


def a_read_path(ctx, arg):
    return open_errno(arg, os.O_RDONLY), 0


def a_write_own_dir(ctx, arg):
    return open_errno(os.path.join(os.path.dirname(os.path.abspath(__file__)), "planted.py"),
                      os.O_WRONLY | os.O_CREAT), 0


def a_write_own_file(ctx, arg):
    return open_errno(os.path.abspath(__file__), os.O_WRONLY | os.O_APPEND), 0


def a_write_tmp(ctx, arg):
    e = open_errno("/tmp/allowed-%%d" %% os.getpid(), os.O_WRONLY | os.O_CREAT)
    if not e:
        os.unlink("/tmp/allowed-%%d" %% os.getpid())
    return e, 0


def a_mknod(ctx, arg):
    return errno_of(os.mknod, "/tmp/null", 0o600 | stat.S_IFCHR, os.makedev(1, 3)), 0


def a_mkfifo(ctx, arg):
    return errno_of(os.mkfifo, "/tmp/fifo", 0o600), 0


def a_symlink(ctx, arg):
    return errno_of(os.symlink, "/proc/1/root", "/tmp/lnk"), 0


def a_hardlink(ctx, arg):
    fd = os.open("/tmp/src", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    try:
        return errno_of(os.link, "/tmp/src", "/tmp/dst"), 0
    finally:
        os.unlink("/tmp/src")


def a_proc1_root_shadow(ctx, arg):
    return open_errno("/proc/1/root/etc/shadow", os.O_RDONLY), 0


def a_proc1_root_list(ctx, arg):
    """What /proc/1/root is from inside: value = 1 if it shows the host's own view."""
    try:
        names = os.listdir("/proc/1/root")
    except OSError as exc:
        return exc.errno, 0
    return 0, int(set(names) == set(os.listdir("/")))


def a_proc_self_mem(ctx, arg):
    """Write our own code through /proc/self/mem: value = 1 if the write went through."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR)
    except OSError as exc:
        return exc.errno, 0
    try:
        addr = ctypes.cast(_libc.getpid, ctypes.c_void_p).value
        original = os.pread(fd, 1, addr)
        try:
            os.pwrite(fd, original, addr)          # the same byte back: harmless if it works
        except OSError as exc:
            return exc.errno, 0
        return 0, 1
    finally:
        os.close(fd)


def a_fork(ctx, arg):
    try:
        pid = os.fork()
    except OSError as exc:
        return exc.errno, 0
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return 0, pid


def process_call(nr, *args):
    """A call that makes a process if it works: the child (result 0) leaves at once."""
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r == 0:
        os._exit(0)
    if r == -1:
        return ctypes.get_errno(), 0
    os.waitpid(r, 0)
    return 0, r


def a_vfork(ctx, arg):
    return process_call(58)


def a_clone_process(ctx, arg):
    return process_call(56, 17, 0, 0, 0, 0)     # clone(SIGCHLD): a process, no CLONE_THREAD


def a_execve(ctx, arg):
    return errno_of(os.execv, sys.executable, [sys.executable, "-c", "pass"]), 0


def a_ptrace(ctx, arg):
    return sys_call(101, 16, int(arg or 1), 0, 0), 0          # PTRACE_ATTACH


def a_process_vm_writev(ctx, arg):
    return sys_call(311, int(arg or 1), 0, 0, 0, 0, 0), 0


def a_kill(ctx, arg):
    return errno_of(os.kill, int(arg), 0), 0


def a_getppid(ctx, arg):
    return 0, os.getppid()


def a_setuid(ctx, arg):
    return sys_call(105, 0), 0


def a_setgid(ctx, arg):
    return sys_call(106, 0), 0


def a_capset(ctx, arg):
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)(1 << 21, 1 << 21, 0, 0, 0, 0)  # CAP_SYS_ADMIN
    return sys_call(126, ctypes.addressof(header), ctypes.addressof(data)), 0


def a_unshare(ctx, arg):
    return sys_call(272, 0x10000000), 0                     # CLONE_NEWUSER


def a_setns(ctx, arg):
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        return sys_call(308, fd, 0), 0
    finally:
        os.close(fd)


def a_mount(ctx, arg):
    return sys_call(165, ctypes.addressof(ctypes.create_string_buffer(b"none")),
                    ctypes.addressof(ctypes.create_string_buffer(b"/tmp")),
                    ctypes.addressof(ctypes.create_string_buffer(b"tmpfs")), 0, 0), 0


def a_pivot_root(ctx, arg):
    dot = ctypes.create_string_buffer(b"/tmp")
    return sys_call(155, ctypes.addressof(dot), ctypes.addressof(dot)), 0


def a_seccomp(ctx, arg):
    return sys_call(317, 1, 0, 0), 0      # SECCOMP_SET_MODE_FILTER, NULL prog: EFAULT if it got through


def a_prctl_dumpable(ctx, arg):
    return sys_call(157, 4, 1, 0, 0, 0), 0


def a_prctl_securebits(ctx, arg):
    return sys_call(157, 28, 0, 0, 0, 0), 0


def a_personality(ctx, arg):
    return sys_call(135, 0x0400000), 0    # READ_IMPLIES_EXEC


def a_io_uring_setup(ctx, arg):
    return sys_call(425, 1, 0), 0


def a_userfaultfd(ctx, arg):
    return sys_call(323, os.O_CLOEXEC), 0


def a_bpf(ctx, arg):
    return sys_call(321, 0, 0, 0), 0


def a_keyctl(ctx, arg):
    return sys_call(250, 0, -3, 0), 0     # KEYCTL_GET_KEYRING_ID, session keyring


def a_perf_event_open(ctx, arg):
    return sys_call(298, 0, 0, -1, -1, 0), 0


def a_open_by_handle_at(ctx, arg):
    return sys_call(304, channel_fd(), 0, 0), 0


def a_socket(ctx, arg):
    family = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX,
              "netlink": socket.AF_NETLINK, "packet": socket.AF_PACKET}[arg]
    kind = socket.SOCK_RAW if arg in ("netlink", "packet") else socket.SOCK_STREAM
    return errno_of(lambda: socket.socket(family, kind).close()), 0


def a_connect_dm(ctx, arg):
    s = socket.socket(fileno=os.dup(channel_fd()))
    try:
        return errno_of(s.connect, arg), 0
    finally:
        s.close()


def a_sendto_abstract(ctx, arg):
    s = socket.socket(fileno=os.dup(channel_fd()))
    try:
        return errno_of(s.sendto, b"x", arg.encode()), 0
    finally:
        s.close()


def a_threads(ctx, arg):
    stop = threading.Event()
    started = []
    err = 0
    try:
        for _ in range(int(arg)):
            t = threading.Thread(target=stop.wait)
            t.start()
            started.append(t)
    except RuntimeError:
        err = errno.EAGAIN
    stop.set()
    for t in started:
        t.join()
    return err, len(started)


def a_fds(ctx, arg):
    fds, err = [], 0
    try:
        for _ in range(int(arg)):
            fds.extend(os.pipe())
    except OSError as exc:
        err = exc.errno
    for fd in fds:
        os.close(fd)
    return err, len(fds)


def a_fds_hold(ctx, arg):
    """Take every fd the host may have, hold them ``arg`` ms, then give them back."""
    fds, err = [], 0
    try:
        while True:
            fds.extend(os.pipe())
    except OSError as exc:
        err = exc.errno
    try:
        while fds:                      # a pipe needs two: take the last one alone
            fds.append(os.dup(fds[0]))
    except OSError:
        pass
    try:
        time.sleep(int(arg) / 1000)
    finally:
        for fd in fds:
            os.close(fd)
    return err, len(fds)


def a_fill_tmp(ctx, arg):
    chunk, written, err = b"\xaa" * (1 << 20), 0, 0
    path = "/tmp/fill"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while written < int(arg):
            written += os.write(fd, chunk)
    except OSError as exc:
        err = exc.errno
    finally:
        os.close(fd)
        os.unlink(path)
    return err, written


def a_memory(ctx, arg):
    hoard = []
    try:
        while True:
            hoard.append(bytearray(16 << 20))
    except MemoryError:
        n = len(hoard)
        hoard.clear()
        return errno.ENOMEM, n


def a_spin(ctx, arg):
    while True:
        pass


def a_exit(ctx, arg):
    os._exit(3)


def a_whoami(ctx, arg):
    return 0, ctx.kernel.driver_id


def a_open_dev_as(ctx, arg):
    """open_device('/dev/null') through a KernelProxy that claims driver id ``arg``."""
    proxy = type(ctx.kernel)(ctx.kernel._channel, int(arg))
    try:
        fd = proxy.open_device("/dev/null", os.O_RDONLY)
    except OSError as exc:
        return exc.errno, 0
    os.close(fd)
    return 0, fd


def a_park(ctx, arg):
    PARKED["req"] = current_request()
    time.sleep(int(arg) / 1000)
    return 0, 0


def a_forge_parked(ctx, arg):
    req = PARKED["req"]
    # status ENOTRECOVERABLE: an errno no layer of drvbox produces, so the victim can tell
    frame = struct.pack("<BBHIIIiq", 1, 33, 0, req.req_id, req.driver_id, 0, errno.ENOTRECOVERABLE, 0)
    os.write(channel_fd(), frame)
    time.sleep(1)
    return 0, 0


def request_lane():
    """The lane the request being served came on (None: the channel), from the host's stack."""
    f = sys._getframe()
    while f is not None:
        if "lane" in f.f_locals and "frame" in f.f_locals:
            return f.f_locals["lane"]
        f = f.f_back
    return None


def a_lane_extra_reply(ctx, arg):
    """Answer our own request on its lane first; the host's genuine reply then follows, a frame
    left on the lane for whichever request uses it next."""
    lane, req = request_lane(), current_request()
    if lane is None:
        return errno.ENOENT, 0
    forged = struct.pack("<BBHIIIiq", 1, 33, 0, req.req_id, req.driver_id, 0, 0, 0)
    os.write(lane.fileno(), forged)
    os.write(lane.fileno(), forged)     # and a second, left for the next request on this lane
    return 0, 0


def a_lane_close(ctx, arg):
    """Close the host's end of the lane the request came on: its reply can never arrive."""
    lane = request_lane()
    if lane is None:
        return errno.ENOENT, 0
    os.close(lane.fileno())
    return 0, 0


def a_huge_tail(ctx, arg):
    """A LOG frame whose tail is larger than any frame the Reflector reads."""
    line = b"A" * (200 * 1024)
    frame = struct.pack("<BBHIIII", 1, 35, 0, 0, current_request().driver_id, len(line), 20) + line
    return errno_of(os.write, channel_fd(), frame), 0


def a_lying_tail(ctx, arg):
    """A LOG frame whose header claims more tail than it carries."""
    frame = struct.pack("<BBHIIII", 1, 35, 0, 0, current_request().driver_id, 50000, 20) + b"short"
    os.write(channel_fd(), frame)
    time.sleep(3)
    return 0, 0


def a_kcall_flood(ctx, arg):
    """KCALL LOG frames as fast as the channel takes them, never waiting for a KREPLY."""
    drv = current_request().driver_id
    fd = channel_fd()
    n = 0
    try:
        for i in range(int(arg)):
            tail = b"flood"
            os.write(fd, struct.pack("<BBHIIIHQQQ", 1, 34, 0, 0x40000000 + i, drv, len(tail), 13, 20, 0, 0) + tail)
            n += 1
    except OSError as exc:
        return exc.errno, n
    time.sleep(3)
    return 0, n


def a_kernel_log_flood(ctx, arg):
    """ctx.kernel.log, the documented API, as fast as the Reflector answers."""
    n = 0
    try:
        for i in range(int(arg)):
            ctx.kernel.log(20, "kflood-%%d" %% i)
            n += 1
    except OSError as exc:
        return exc.errno, n
    return 0, n


OPENS = [0]


def a_open_count(ctx, arg):
    return 0, OPENS[0]


ATTACKS = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("a_")}


class Driver(StreamDriver):
    def init(self, ctx):
        self.ctx = ctx

    def open(self, access, share):
        OPENS[0] += 1
        return {}

    def close(self, opened):
        OPENS[0] -= 1

    def io_control(self, opened, code, inbuf, outbuf):
        if code == ECHO:
            n = min(len(inbuf), len(outbuf))
            outbuf[:n] = inbuf[:n]
            return n
        if code != ATTACK:
            raise DriverError(errno.ENOTTY)
        request = json.loads(bytes(inbuf))
        err, value = ATTACKS[request["attack"]](self.ctx, request.get("arg"))
        struct.pack_into("<IiQ", outbuf, 0, SENTINEL, err, value & 0xFFFFFFFFFFFFFFFF)
        return 16
''' % {"sentinel": SENTINEL, "attack": ATTACK, "echo": ECHO}
