/* The CE stream interface as drvbox calls it (docs/native-drivers.md): DWORD is uint32_t. */
#ifndef DRVBOX_NATIVE_H
#define DRVBOX_NATIVE_H

#include <stdint.h>

typedef uint32_t DWORD;
typedef uint16_t WORD;
typedef uint8_t BYTE;
typedef int BOOL;
#define TRUE 1
#define FALSE 0
#define FILE_BEGIN 0
#define FILE_CURRENT 1
#define FILE_END 2
#define DRVBOX_FAILED ((DWORD)-1)

/* Entry names: PREFIX_Name, or Name alone for a driver registered with DEVFLAGS_NAKEDENTRIES. */
#ifdef NAKED
#define ENTRY(prefix, name) name
#else
#define ENTRY(prefix, name) ENTRY_(prefix, name)
#define ENTRY_(prefix, name) prefix##_##name
#endif

#define EXPORT __attribute__((visibility("default")))

#endif
