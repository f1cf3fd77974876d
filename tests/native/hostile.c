/* A hostile native driver (tests/adversarial/test_adv_native.py): one IOCTL code per attack on its
 * own host and, through it, on the Device Manager.  Every attack answers in its output buffer, so
 * that the test can tell an attack that was refused from one that never ran:
 *   out[0..4) = SENTINEL, out[4..8) = the errno the attack got (0: it worked), out[8..16) = a value.
 * Never load it in kernel mode. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "drvbox_native.h"

#define SENTINEL 0xD7B0C5E1u
#define CODE(n) (0x00220000u + 4u * (n))
#define IOCTL_ECHO CODE(0)
#define IOCTL_SYSCALL CODE(1)        /* in: u64 nr, 6 x u64 args; a raw syscall(2) */
#define IOCTL_UNGUARD CODE(2)        /* every guard page of the arena made RW, all of it but our own
                                        buffers overwritten (other slots, the layout descriptor) */
#define IOCTL_ACTUAL CODE(3)         /* in: u32; *actual = that, TRUE (output untouched) */
#define IOCTL_LATE_WRITER CODE(4)    /* echo, and a thread keeps writing the output after the return */
#define IOCTL_SURVIVE CODE(5)        /* a SIGSEGV handler that unprotects the faulting page, then a
                                        write far past the output: through the guard page */
#define IOCTL_CLOSE_FDS CODE(6)      /* close every fd from 3 up: the channel and the lanes */
#define IOCTL_INT80 CODE(7)          /* getpid through the i386 ABI (int $0x80) */
#define IOCTL_CTOR CODE(8)           /* what the constructor saw: errno of socket() at dlopen time */
#define IOCTL_WEDGE CODE(9)          /* in: u32 n; after returning, a thread takes the GIL for good (no
                                        Python thread of the host runs again: nobody reads the
                                        channel) and writes n KCALL frames to the channel, fd 3 */

static int ctor_socket_errno = -1;
static volatile int late_stop;

/* Runs at dlopen, before Init: the host is already confined (seccomp, mount view, no capabilities). */
__attribute__((constructor)) static void at_dlopen(void)
{
    long fd = syscall(SYS_socket, 2 /* AF_INET */, 1 /* SOCK_STREAM */, 0);
    ctor_socket_errno = fd < 0 ? errno : 0;
    if (fd >= 0)
        close((int)fd);
}

static BOOL answer(BYTE *out, DWORD out_len, DWORD *actual, int err, uint64_t value)
{
    uint32_t magic = SENTINEL;
    int32_t e = err;
    if (out_len < 16) { *actual = 0; return FALSE; }
    memcpy(out, &magic, 4);
    memcpy(out + 4, &e, 4);
    memcpy(out + 8, &value, 8);
    *actual = 16;
    return TRUE;
}

/* The span of the host's arena: every line of /proc/self/maps of its memfd (the guard pages split
 * it into one mapping per slot and guard). */
static int arena_span(uintptr_t *start, uintptr_t *end)
{
    char line[512];
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return errno;
    *start = UINTPTR_MAX;
    *end = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (strstr(line, "drvbox-arena") && sscanf(line, "%lx-%lx", &s, &e) == 2) {
            if (s < *start) *start = s;
            if (e > *end) *end = e;
        }
    }
    fclose(f);
    return *end ? 0 : ENOENT;
}

static void on_segv(int sig, siginfo_t *info, void *uc)
{
    (void)sig; (void)uc;
    uintptr_t page = (uintptr_t)info->si_addr & ~(uintptr_t)4095;
    if (mprotect((void *)page, 4096, PROT_READ | PROT_WRITE) != 0)
        _exit(99);
}

struct late { volatile BYTE *out; DWORD len; };

static void *late_writer(void *arg)
{
    struct late *l = arg;
    /* Long enough to race the Reflector's copy-out and the next request's copy-in. */
    for (long i = 0; i < 200000 && !late_stop; i++) {
        for (DWORD j = 0; j < l->len; j++) l->out[j] = 0xEE;
    }
    free(l);
    return NULL;
}

static void *wedge(void *arg)
{
    uint32_t n = (uint32_t)(uintptr_t)arg;
    int (*gil)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    usleep(500 * 1000);             /* let the host send the IOCTL's reply first */
    if (gil) gil();
    for (uint32_t i = 0; i < n; i++) {
        /* hosts/wire.py: version 1, KCALL (34), flags, req id, driver id 1, tail 0; body: READ_REGISTER
         * (3) of a region handle nobody has */
        unsigned char frame[42] = {1, 34};
        uint32_t req = 0x40000000u + i, drv = 1;
        uint16_t kop = 3;
        uint64_t handle = 999;
        memcpy(frame + 4, &req, 4);
        memcpy(frame + 8, &drv, 4);
        memcpy(frame + 16, &kop, 2);
        memcpy(frame + 18, &handle, 8);
        if (write(3, frame, sizeof frame) < 0) break;
    }
    for (;;) pause();
    return NULL;
}

EXPORT DWORD HST_Init(const char *ctx, const void *bus) { (void)ctx; (void)bus; return 1; }
EXPORT BOOL HST_Deinit(DWORD dev) { (void)dev; late_stop = 1; return TRUE; }
EXPORT DWORD HST_Open(DWORD dev, DWORD access, DWORD share) { (void)dev; (void)access; (void)share; return 1; }
EXPORT BOOL HST_Close(DWORD h) { (void)h; return TRUE; }

EXPORT DWORD HST_Read(DWORD h, void *buf, DWORD count)
{
    (void)h;
    if (count) memset(buf, 0x11, count);
    return count + 1;               /* one byte more than the buffer holds */
}

EXPORT BOOL HST_IOControl(DWORD h, DWORD code, BYTE *in, DWORD in_len, BYTE *out, DWORD out_len, DWORD *actual)
{
    (void)h;
    *actual = 0;
    switch (code) {
    case IOCTL_ECHO:
        *actual = in_len < out_len ? in_len : out_len;
        if (*actual) memcpy(out, in, *actual);
        return TRUE;
    case IOCTL_SYSCALL: {
        uint64_t a[7] = {0};
        if (in_len < sizeof a) return FALSE;
        memcpy(a, in, sizeof a);
        errno = 0;
        long r = syscall((long)a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
        return answer(out, out_len, actual, r == -1 ? errno : 0, (uint64_t)r);
    }
    case IOCTL_UNGUARD: {
        uintptr_t start = 0, end = 0, o = (uintptr_t)out, i = (uintptr_t)in;
        int err = arena_span(&start, &end);
        if (err) return answer(out, out_len, actual, err, 0);
        if (mprotect((void *)start, end - start, PROT_READ | PROT_WRITE) != 0)
            return answer(out, out_len, actual, errno, 0);
        uint64_t written = 0;
        for (uintptr_t p = start; p < end; p++) {
            if ((p >= o && p < o + out_len) || (in_len && p >= i && p < i + in_len)) continue;
            *(volatile BYTE *)p = 0xAA;
            written++;
        }
        return answer(out, out_len, actual, 0, written);
    }
    case IOCTL_ACTUAL: {
        DWORD value = 0;
        if (in_len >= 4) memcpy(&value, in, 4);
        *actual = value;
        return TRUE;
    }
    case IOCTL_LATE_WRITER: {
        struct late *l = malloc(sizeof *l);
        pthread_t t;
        if (!l) return FALSE;
        *l = (struct late){out, out_len};
        *actual = in_len < out_len ? in_len : out_len;
        if (*actual) memcpy(out, in, *actual);
        if (pthread_create(&t, NULL, late_writer, l) != 0) { free(l); return FALSE; }
        pthread_detach(t);
        return TRUE;
    }
    case IOCTL_SURVIVE: {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
        /* Two pages past the end of the output: over the guard page into the next slot. */
        volatile BYTE *o = out;
        uintptr_t end = ((uintptr_t)out + out_len + 4095) & ~(uintptr_t)4095;
        for (uintptr_t p = (uintptr_t)out + out_len; p < end + 2 * 4096; p++)
            o[p - (uintptr_t)out] = 0xBB;
        return answer(out, out_len, actual, 0, end + 2 * 4096 - ((uintptr_t)out + out_len));
    }
    case IOCTL_CLOSE_FDS:
        for (int fd = 3; fd < 1024; fd++) close(fd);
        return answer(out, out_len, actual, 0, 0);
    case IOCTL_INT80: {
#if defined(__x86_64__)
        long r = 20;                    /* __NR_getpid on i386 */
        __asm__ volatile ("int $0x80" : "+a"(r) : : "memory");
        return answer(out, out_len, actual, r < 0 ? (int)-r : 0, (uint64_t)r);
#else
        return answer(out, out_len, actual, ENOSYS, 0);
#endif
    }
    case IOCTL_WEDGE: {
        struct stat st;
        uint32_t n = 0;
        pthread_t t;
        if (in_len >= 4) memcpy(&n, in, 4);
        if (fstat(3, &st) != 0 || !S_ISSOCK(st.st_mode)) return answer(out, out_len, actual, ENOTSOCK, 0);
        if (pthread_create(&t, NULL, wedge, (void *)(uintptr_t)n) != 0) return answer(out, out_len, actual, EAGAIN, 0);
        pthread_detach(t);
        return answer(out, out_len, actual, 0, n);
    }
    case IOCTL_CTOR:
        return answer(out, out_len, actual, ctor_socket_errno, 0);
    default:
        errno = ENOTTY;
        return FALSE;
    }
}
