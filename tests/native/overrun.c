/* A native driver that writes where it must not, each way on its own IOCTL code.  In a host every
 * one of them faults on a guard page (or on its read-only input) and the host dies of SIGSEGV;
 * never load it in kernel mode. */
#include <string.h>

#include "drvbox_native.h"

#define CODE(n) (0x00220000u + 4u * (n))
#define IOCTL_ECHO CODE(0)
#define IOCTL_PAST_END CODE(1)      /* one byte after the output buffer */
#define IOCTL_BEFORE_START CODE(2)  /* one byte before the output buffer */
#define IOCTL_RUNAWAY CODE(3)       /* keeps writing forward from the output buffer until it faults */
#define IOCTL_WRITE_INPUT CODE(4)   /* writes the first byte of its input */

EXPORT DWORD OVR_Init(const char *ctx, const void *bus) { (void)ctx; (void)bus; return 1; }
EXPORT BOOL OVR_Deinit(DWORD dev) { (void)dev; return TRUE; }
EXPORT DWORD OVR_Open(DWORD dev, DWORD access, DWORD share) { (void)dev; (void)access; (void)share; return 1; }
EXPORT BOOL OVR_Close(DWORD h) { (void)h; return TRUE; }

EXPORT BOOL OVR_IOControl(DWORD h, DWORD code, BYTE *in, DWORD in_len, BYTE *out, DWORD out_len, DWORD *actual)
{
    volatile BYTE *o = out;
    (void)h;
    *actual = 0;
    switch (code) {
    case IOCTL_ECHO:
        *actual = in_len < out_len ? in_len : out_len;
        memcpy(out, in, *actual);
        return TRUE;
    case IOCTL_PAST_END:
        o[out_len] = 0xAA;
        return TRUE;
    case IOCTL_BEFORE_START:
        o[-1] = 0xAA;
        return TRUE;
    case IOCTL_RUNAWAY:
        for (unsigned long i = 0; i < (1ul << 30); i++)
            o[i] = 0xAA;
        return TRUE;
    case IOCTL_WRITE_INPUT:
        ((volatile BYTE *)in)[0] = 0xAA;
        return TRUE;
    default:
        return FALSE;
    }
}
