"""The host's system-call allowlist, as data: one line per call, each with why the host needs it.

Everything not listed here goes to the default action: a user notification to the Reflector's
``SyscallSupervisor``, which reports the call and answers EPERM (or kills the host).  Built for
CPython 3.11 on x86_64 glibc running ``hosts.main`` and its drivers, after import; the launcher
imports the target before the filter is loaded, so nothing needed only at import time is here.
"""

from __future__ import annotations

# name -> reason.  Keep sorted by concern, not alphabetically: a reviewer reads it as a story.
ALLOWED: dict[str, str] = {
    # --- memory -------------------------------------------------------------------------------
    "brk": "malloc's main arena",
    "mmap": "malloc's large blocks, thread stacks, the shared-memory arena, ctypes native drivers",
    "munmap": "the reverse of mmap",
    "mremap": "realloc of large blocks",
    "mprotect": "thread stack guard pages; the dynamic loader for native drivers",
    "madvise": "glibc returns freed memory and thread stacks with MADV_DONTNEED",
    # --- threads ------------------------------------------------------------------------------
    # clone is allowed only with CLONE_THREAD in its flags (sandbox/seccomp.py adds that rule);
    # clone3 answers ENOSYS so glibc falls back to clone, whose flags a filter can see.
    "futex": "every lock, condition and thread join",
    "set_robust_list": "set by glibc for each new thread",
    "rseq": "registered by glibc for each new thread",
    "sched_yield": "spin locks in glibc and CPython's GIL hand-off",
    "sched_getaffinity": "os.cpu_count() and sizing of worker pools",
    "gettid": "threading.get_native_id(), logging",
    "exit": "a thread ends",
    "exit_group": "the host ends",
    # --- signals: only its own, its pid namespace holds nothing else --------------------------
    "rt_sigaction": "CPython installs and restores signal handlers",
    "rt_sigprocmask": "glibc blocks signals around thread creation",
    "rt_sigreturn": "return from a signal handler",
    "sigaltstack": "faulthandler and CPython's stack-overflow guard",
    "tgkill": "raise() and pthread_kill within the host; no other process is visible",
    "kill": "os.kill within the host; no other process is visible in its pid namespace",
    "getpid": "os.getpid(), raise()",
    "getppid": "os.getppid() (0: the parent is outside the pid namespace)",
    "restart_syscall": "the kernel restarts a call interrupted by a signal",
    # --- files: its own fds, the read-only view, its private /tmp -----------------------------
    "read": "the channel, the arena, files",
    "write": "the channel, logging to stderr, files in /tmp",
    "readv": "buffered I/O",
    "writev": "buffered I/O",
    "pread64": "positioned reads (zipimport, native drivers)",
    "pwrite64": "positioned writes to files in /tmp",
    "lseek": "file objects",
    "openat": "import of driver modules from the read-only view, files in /tmp",
    "close": "every fd it owns",
    "close_range": "os.closerange",
    "dup": "socket.socket(fileno=...) and file objects",
    "dup2": "file objects",
    "dup3": "file objects",
    "fcntl": "O_NONBLOCK and FD_CLOEXEC on its own fds",
    "ioctl": "FIONREAD and terminal queries on inherited fds, device ioctls on fds the Reflector "
             "opened for a driver (TIOCSTI and TIOCLINUX are refused: see sandbox/seccomp.py)",
    "fstat": "file objects",
    "newfstatat": "os.stat, imports",
    "statx": "os.stat on newer glibc",
    "faccessat": "os.access, imports",
    "faccessat2": "os.access on newer glibc",
    "readlink": "os.path.realpath",
    "readlinkat": "os.path.realpath",
    "getdents64": "os.listdir, os.scandir (driver packages)",
    "getcwd": "os.getcwd, imports",
    "ftruncate": "files in /tmp",
    "fsync": "files in /tmp",
    "fdatasync": "files in /tmp",
    "mkdir": "directories in /tmp (the rest of the view is read-only)",
    "mkdirat": "directories in /tmp",
    "unlink": "files in /tmp",
    "unlinkat": "files in /tmp",
    "rename": "files in /tmp",
    "renameat": "files in /tmp",
    "rmdir": "directories in /tmp",
    "statfs": "os.statvfs",
    "fstatfs": "os.fstatvfs",
    "umask": "tempfile",
    # --- the channel to the Reflector: fds it was given, never a new socket --------------------
    "sendmsg": "frames and fds to the Reflector over the inherited socketpair",
    "recvmsg": "frames and fds from the Reflector",
    "sendto": "socket.send on the inherited socketpair",
    "recvfrom": "socket.recv on the inherited socketpair",
    "getsockopt": "socket.socket(fileno=...) asks the socket's type and protocol",
    "getsockname": "socket.socket(fileno=...) asks the socket's family",
    "getpeername": "logging the peer of the channel",
    "shutdown": "closing the channel",
    # --- waiting ------------------------------------------------------------------------------
    "poll": "select module, waiting on the channel",
    "ppoll": "select module on newer glibc",
    "select": "select.select",
    "pselect6": "select.select on newer glibc",
    "epoll_create1": "selectors",
    "epoll_ctl": "selectors",
    "epoll_wait": "selectors",
    "epoll_pwait": "selectors on newer glibc",
    "eventfd2": "wake-ups between the host's threads",
    "pipe2": "wake-ups between the host's threads",
    "nanosleep": "time.sleep",
    "clock_nanosleep": "time.sleep",
    # --- time and identity (read-only) --------------------------------------------------------
    "clock_gettime": "time.monotonic when the vDSO is not used",
    "clock_getres": "time.get_clock_info",
    "gettimeofday": "time.time when the vDSO is not used",
    "getrandom": "os.urandom, hash randomisation, random",
    "getuid": "os.getuid",
    "geteuid": "os.geteuid",
    "getgid": "os.getgid",
    "getegid": "os.getegid",
    "getgroups": "os.getgroups",
    "getresuid": "os.getresuid",
    "getresgid": "os.getresgid",
    "uname": "platform, os.uname",
    "prlimit64": "resource.getrlimit (lowering only: it holds no CAP_SYS_RESOURCE)",
    "getrusage": "resource.getrusage, time.process_time",
    "sysinfo": "glibc's memory queries",
    "times": "os.times",
}

# Never allowed, whatever a policy's Syscalls says: each creates a process, changes what the
# kernel is, reaches another process's memory, or opens a way out of the namespaces.
FORBIDDEN: dict[str, str] = {
    "execve": "runs a new program (no exec after seccomp, ever)",
    "execveat": "runs a new program",
    "fork": "creates a process",
    "vfork": "creates a process",
    "clone3": "its flags are in memory a filter cannot read; answered ENOSYS so glibc uses clone",
    "ptrace": "controls another process",
    "process_vm_readv": "reads another process's memory",
    "process_vm_writev": "writes another process's memory",
    "process_madvise": "acts on another process's memory",
    "pidfd_open": "reaches another process",
    "pidfd_getfd": "steals another process's fds",
    "kcmp": "compares other processes' kernel objects",
    "socket": "opens a new network or netlink endpoint",
    "socketpair": "creates sockets; the host has its channel",
    "connect": "reaches a new endpoint",
    "bind": "creates an endpoint",
    "listen": "creates an endpoint",
    "accept": "creates an endpoint",
    "accept4": "creates an endpoint",
    "mount": "changes the mount view",
    "umount2": "changes the mount view",
    "pivot_root": "changes the mount view",
    "chroot": "changes the root",
    "move_mount": "changes the mount view",
    "open_tree": "changes the mount view",
    "fsopen": "creates a file system",
    "fsmount": "creates a file system",
    "fsconfig": "configures a file system",
    "fspick": "reconfigures a file system",
    "mount_setattr": "changes mount flags",
    "unshare": "creates namespaces",
    "setns": "enters namespaces",
    "bpf": "loads kernel programs",
    "perf_event_open": "kernel profiling, a classic exploit primitive",
    "userfaultfd": "stalls the kernel at will, a classic exploit primitive",
    "io_uring_setup": "a second system-call interface the filter does not see",
    "io_uring_enter": "a second system-call interface",
    "io_uring_register": "a second system-call interface",
    "keyctl": "the kernel keyring",
    "add_key": "the kernel keyring",
    "request_key": "the kernel keyring",
    "init_module": "loads kernel code",
    "finit_module": "loads kernel code",
    "delete_module": "unloads kernel code",
    "kexec_load": "replaces the kernel",
    "kexec_file_load": "replaces the kernel",
    "reboot": "stops the machine",
    "swapon": "changes the machine",
    "swapoff": "changes the machine",
    "acct": "changes the machine",
    "quotactl": "changes the machine",
    "setuid": "changes identity",
    "setgid": "changes identity",
    "setreuid": "changes identity",
    "setregid": "changes identity",
    "setresuid": "changes identity",
    "setresgid": "changes identity",
    "setgroups": "changes identity",
    "setfsuid": "changes identity",
    "setfsgid": "changes identity",
    "capset": "changes capabilities",
    "prctl": "changes securebits, dumpable, seccomp, the parent-death signal",
    "seccomp": "changes the filter",
    "personality": "changes the ABI (READ_IMPLIES_EXEC)",
    "modify_ldt": "changes segment descriptors",
    "iopl": "raw port access",
    "ioperm": "raw port access",
    "name_to_handle_at": "opens files by handle, around the mount view",
    "open_by_handle_at": "opens files by handle, around the mount view (the shocker escape)",
    "memfd_secret": "memory the kernel cannot inspect",
    "lookup_dcookie": "kernel profiling",
    "vmsplice": "page-cache games, a classic exploit primitive",
    "fanotify_init": "watches the file system",
    "landlock_create_ruleset": "the host does not confine itself further",
    "syslog": "the kernel log",
    "settimeofday": "changes the clock",
    "clock_settime": "changes the clock",
    "clock_adjtime": "changes the clock",
    "adjtimex": "changes the clock",
}

# Bits of the clone flags argument.
CLONE_THREAD = 0x00010000
# The namespaces clone can create (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET): a
# "thread" made with any of them no longer shares everything with the host.  Refused by the filter
# itself, not left to the kernel's capability check (the host holds none today; deny by default
# should not hang on that).  glibc's pthread_create sets none of them.
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# ioctl requests refused even though ioctl is allowed: both inject input into a terminal.
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# When a policy lists the ioctl requests its device nodes take, ioctl is allowed for those and for
# these alone -- the ones the host's own runtime issues, each with why.
BASE_IOCTLS = {
    0x5421: "FIONBIO: CPython switches sockets between blocking and non-blocking with it (settimeout)",
    0x5451: "FIOCLEX: close-on-exec on an fd (os.set_inheritable)",
    0x5450: "FIONCLEX: the same, cleared",
    0x541B: "FIONREAD: bytes waiting on a socket or pipe",
    0x5401: "TCGETS: isatty() on the host's stdio (a terminal query, changes nothing)",
}


def masked_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi]`` as aligned power-of-two blocks ``(value, mask)``: ``x & mask == value``.

    seccomp compares one argument once per rule, so a range (two comparisons) is written as the
    few aligned blocks that cover it exactly, like a route table covers an address range.
    """
    if not 0 <= lo <= hi <= 0xFFFFFFFF:
        raise ValueError(f"ioctl range {lo:#x}-{hi:#x} is not within 32 bits")
    blocks = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 32
        while size > hi - lo + 1:
            size >>= 1
        blocks.append((lo, 0xFFFFFFFF & ~(size - 1)))
        lo += size
    return blocks


def refuse_forbidden(names: tuple[str, ...]) -> list[str]:
    """The entries of ``names`` (a policy's ``Syscalls``) that may never be allowed, with reasons."""
    return [f"{name} ({FORBIDDEN[name]})" for name in names if name in FORBIDDEN]


assert not set(ALLOWED) & set(FORBIDDEN), "a call is both allowed and forbidden"
