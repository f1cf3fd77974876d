/* A well-behaved native driver: IOCTL echo, a byte store read and written at a per-open position,
 * Seek, and errors both ways (GetLastError and errno).  Built with -DNAKED it exports unprefixed
 * names; with -DNO_DEINIT it lacks a required entry (the load must fail naming it). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "drvbox_native.h"

#define P ECH
#define CODE(n) (0x00220000u + 4u * (n))
#define IOCTL_ECHO CODE(0)          /* out = in, as much as fits */
#define IOCTL_FAIL_LASTERROR CODE(6) /* fail with the errno in the input's first DWORD, via GetLastError */
#define IOCTL_FAIL_ERRNO CODE(7)    /* the same, via errno */
#define IOCTL_WRITE_INPUT CODE(8)   /* write to the (const) input buffer: faults where it is read-only */
#define IOCTL_CONTEXT CODE(9)       /* out = the context string Init got */
#define IOCTL_POWER CODE(10)        /* out = DWORD count of PowerUp, DWORD count of PowerDown */
#define STORE 1048576
#define OPENS 64

static __thread DWORD last_error;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char store[STORE];
static size_t store_len;
static long positions[OPENS + 1];
static int used[OPENS + 1];
static char context[64];
static DWORD ups, downs;

static BOOL fail(DWORD code) { last_error = code; return FALSE; }

EXPORT DWORD ENTRY(P, GetLastError)(void) { return last_error; }

EXPORT DWORD ENTRY(P, Init)(const char *ctx, const void *bus)
{
    (void)bus;
    strncpy(context, ctx ? ctx : "", sizeof context - 1);
    return 0x1234;
}

#ifndef NO_DEINIT
EXPORT BOOL ENTRY(P, Deinit)(DWORD dev) { return dev == 0x1234; }
#endif

EXPORT DWORD ENTRY(P, Open)(DWORD dev, DWORD access, DWORD share)
{
    (void)access; (void)share;
    if (dev != 0x1234) { last_error = EINVAL; return 0; }
    pthread_mutex_lock(&lock);
    for (DWORD i = 1; i <= OPENS; i++)
        if (!used[i]) { used[i] = 1; positions[i] = 0; pthread_mutex_unlock(&lock); return i; }
    pthread_mutex_unlock(&lock);
    last_error = EMFILE;
    return 0;
}

static int valid(DWORD h) { return h >= 1 && h <= OPENS && used[h]; }

EXPORT BOOL ENTRY(P, Close)(DWORD h)
{
    if (!valid(h)) return fail(EBADF);
    used[h] = 0;
    return TRUE;
}

EXPORT DWORD ENTRY(P, Read)(DWORD h, void *buf, DWORD count)
{
    if (!valid(h)) { last_error = EBADF; return DRVBOX_FAILED; }
    pthread_mutex_lock(&lock);
    size_t pos = (size_t)positions[h];
    size_t n = pos < store_len ? store_len - pos : 0;
    if (n > count) n = count;
    memcpy(buf, store + pos, n);
    positions[h] += (long)n;
    pthread_mutex_unlock(&lock);
    return (DWORD)n;
}

EXPORT DWORD ENTRY(P, Write)(DWORD h, const void *buf, DWORD count)
{
    if (!valid(h)) { last_error = EBADF; return DRVBOX_FAILED; }
    pthread_mutex_lock(&lock);
    size_t pos = (size_t)positions[h];
    if (pos + count > STORE) { pthread_mutex_unlock(&lock); last_error = ENOSPC; return DRVBOX_FAILED; }
    memcpy(store + pos, buf, count);
    positions[h] += count;
    if (pos + count > store_len) store_len = pos + count;
    pthread_mutex_unlock(&lock);
    return count;
}

EXPORT DWORD ENTRY(P, Seek)(DWORD h, long amount, WORD type)
{
    if (!valid(h)) { last_error = EBADF; return DRVBOX_FAILED; }
    long base;
    switch (type) {
    case FILE_BEGIN: base = 0; break;
    case FILE_CURRENT: base = positions[h]; break;
    case FILE_END: base = (long)store_len; break;
    default: last_error = EINVAL; return DRVBOX_FAILED;
    }
    if (base + amount < 0 || base + amount > STORE) { last_error = EINVAL; return DRVBOX_FAILED; }
    positions[h] = base + amount;
    return (DWORD)positions[h];
}

EXPORT BOOL ENTRY(P, IOControl)(DWORD h, DWORD code, BYTE *in, DWORD in_len, BYTE *out, DWORD out_len,
                                DWORD *actual)
{
    DWORD n, value = 0;
    if (!valid(h)) return fail(EBADF);
    if (in_len >= 4) memcpy(&value, in, 4);
    switch (code) {
    case IOCTL_ECHO:
        n = in_len < out_len ? in_len : out_len;
        if (n) memcpy(out, in, n);
        *actual = n;
        return TRUE;
    case IOCTL_FAIL_LASTERROR:
        return fail(value);
    case IOCTL_FAIL_ERRNO:
        last_error = 0;
        errno = (int)value;
        return FALSE;
    case IOCTL_WRITE_INPUT:
        if (in_len) ((volatile BYTE *)in)[0] ^= 0xFF;
        *actual = 0;
        return TRUE;
    case IOCTL_CONTEXT:
        n = (DWORD)strlen(context);
        if (n > out_len) return fail(ENOSPC);
        memcpy(out, context, n);
        *actual = n;
        return TRUE;
    case IOCTL_POWER:
        if (out_len < 8) return fail(ENOSPC);
        memcpy(out, &ups, 4);
        memcpy(out + 4, &downs, 4);
        *actual = 8;
        return TRUE;
    default:
        return fail(ENOTTY);
    }
}

EXPORT void ENTRY(P, PowerUp)(DWORD dev) { (void)dev; ups++; }
EXPORT void ENTRY(P, PowerDown)(DWORD dev) { (void)dev; downs++; }
