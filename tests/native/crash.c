/* A native driver that dereferences NULL on one IOCTL code and echoes on the others. */
#include <string.h>

#include "drvbox_native.h"

#define IOCTL_ECHO 0x00220000u
#define IOCTL_NULL 0x00220004u

EXPORT DWORD CRS_Init(const char *ctx, const void *bus) { (void)ctx; (void)bus; return 1; }
EXPORT BOOL CRS_Deinit(DWORD dev) { (void)dev; return TRUE; }
EXPORT DWORD CRS_Open(DWORD dev, DWORD access, DWORD share) { (void)dev; (void)access; (void)share; return 1; }
EXPORT BOOL CRS_Close(DWORD h) { (void)h; return TRUE; }

EXPORT BOOL CRS_IOControl(DWORD h, DWORD code, BYTE *in, DWORD in_len, BYTE *out, DWORD out_len, DWORD *actual)
{
    (void)h;
    if (code == IOCTL_NULL) {
        volatile int *nothing = 0;
        *nothing = 1;
    }
    *actual = in_len < out_len ? in_len : out_len;
    memcpy(out, in, *actual);
    return TRUE;
}
