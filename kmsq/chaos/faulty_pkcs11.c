/*
 * faulty_pkcs11.c: a fault-injecting PKCS#11 module for `kmsq chaos` and the tests.
 *
 * TEST TOOLING, NOT PRODUCTION CODE. Never configure it as the module of a real deployment.
 *
 * The module wraps a real PKCS#11 module (SoftHSM2) so that the token can be made to fail on demand
 * while kmsq's own PKCS#11 adapter (worker/hsm.py) is the code under test:
 *
 *   KMSQ_FAULT_REAL_MODULE  path of the real module; loaded with dlopen by the first C_GetFunctionList.
 *   KMSQ_FAULT_FILE         the fault switch. When this file exists and holds a number (decimal, or hex
 *                           with 0x, e.g. "0x32" = CKR_DEVICE_REMOVED), every wrapped function returns
 *                           that CK_RV without calling the real module. Missing, empty, unreadable, zero
 *                           or unparsable means no fault. The file is re-read on every wrapped call.
 *
 * C_GetFunctionList hands out a copy of the real module's function list in which the entries below are
 * replaced by wrappers. Entries are found by comparing the list's pointers with dlsym(real, "C_...")
 * rather than by index, so the list layout is only relied on for its size. Only C_GetFunctionList is
 * exported; the wrappers are static so they can never interpose on the real module's symbols.
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o faulty_pkcs11.so faulty_pkcs11.c -ldl
 */

#define _POSIX_C_SOURCE 200809L /* open flags, strdup, dlopen under a strict -std= too */

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- The few PKCS#11 (v2.40, LP64, unpacked) types this module needs -------------------------------- */

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_FLAGS;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_ULONG CK_USER_TYPE;
typedef CK_ULONG CK_NOTIFICATION;
typedef unsigned char CK_BYTE;
typedef unsigned char CK_UTF8CHAR;
typedef void *CK_VOID_PTR;
typedef struct CK_ATTRIBUTE CK_ATTRIBUTE; /* only passed through: left incomplete */
typedef struct CK_MECHANISM CK_MECHANISM; /* only passed through: left incomplete */
typedef CK_RV (*CK_NOTIFY)(CK_SESSION_HANDLE, CK_NOTIFICATION, CK_VOID_PTR);

typedef struct {
    unsigned char major, minor;
} CK_VERSION;

/* Any function pointer; void (*)(void) is the type GCC lets us cast to and from any function type. */
typedef void (*CK_GENERIC_FN)(void);

#define FUNCTION_COUNT 68 /* C_Initialize ... C_WaitForSlotEvent in PKCS#11 v2.40 */

typedef struct {
    CK_VERSION version;
    CK_GENERIC_FN fn[FUNCTION_COUNT];
} CK_FUNCTION_LIST;

#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_ARGUMENTS_BAD 0x7UL

/* ---- The fault switch ------------------------------------------------------------------------------- */

static const char *fault_file; /* KMSQ_FAULT_FILE, read once at load */

/* Returns 1 and sets *rv when the switch file holds a non-zero code, else 0. */
static int fault_active(CK_RV *rv)
{
    char buf[64];
    ssize_t n;
    int fd, saved_errno = errno;
    char *p, *digits, *end;
    int hex;
    unsigned long code;

    if (fault_file == NULL || (fd = open(fault_file, O_RDONLY | O_CLOEXEC)) < 0) {
        errno = saved_errno;
        return 0;
    }
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    errno = saved_errno;
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    for (p = buf; isspace((unsigned char)*p); p++)
        ;
    hex = p[0] == '0' && (p[1] == 'x' || p[1] == 'X');
    digits = hex ? p + 2 : p;
    if (!(hex ? isxdigit((unsigned char)*digits) : isdigit((unsigned char)*digits)))
        return 0; /* no number (strtoul would also take a sign or blanks here) */
    code = strtoul(digits, &end, hex ? 16 : 10);
    while (isspace((unsigned char)*end))
        end++;
    if (*end != '\0' || code == CKR_OK)
        return 0;
    *rv = code;
    return 1;
}

/* ---- The wrappers ----------------------------------------------------------------------------------- */

/* WRAP(name, (parameters), (arguments)) defines real_name, the saved real entry, and fault_name, the
 * wrapper with the function's exact prototype, which calls the real entry through that prototype. */
#define WRAP(name, params, args)                                                                     \
    static CK_GENERIC_FN real_##name;                                                                \
    static CK_RV fault_##name params                                                                 \
    {                                                                                                \
        CK_RV rv;                                                                                    \
        if (fault_active(&rv))                                                                       \
            return rv;                                                                               \
        return ((CK_RV(*) params)real_##name) args;                                                  \
    }

WRAP(C_OpenSession,
     (CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify, CK_SESSION_HANDLE *session),
     (slot, flags, app, notify, session))
WRAP(C_Login, (CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR *pin, CK_ULONG pin_len),
     (s, user, pin, pin_len))
WRAP(C_GetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE *tmpl, CK_ULONG count),
     (s, o, tmpl, count))
WRAP(C_DestroyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o), (s, o))
WRAP(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl, CK_ULONG count), (s, tmpl, count))
WRAP(C_EncryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key), (s, m, key))
WRAP(C_Encrypt, (CK_SESSION_HANDLE s, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len),
     (s, in, in_len, out, out_len))
WRAP(C_DecryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key), (s, m, key))
WRAP(C_Decrypt, (CK_SESSION_HANDLE s, CK_BYTE *in, CK_ULONG in_len, CK_BYTE *out, CK_ULONG *out_len),
     (s, in, in_len, out, out_len))
WRAP(C_SignInit, (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE key), (s, m, key))
WRAP(C_Sign, (CK_SESSION_HANDLE s, CK_BYTE *data, CK_ULONG len, CK_BYTE *sig, CK_ULONG *sig_len),
     (s, data, len, sig, sig_len))
WRAP(C_GenerateKey,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *tmpl, CK_ULONG count, CK_OBJECT_HANDLE *key),
     (s, m, tmpl, count, key))
WRAP(C_GenerateKeyPair,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_ATTRIBUTE *pub_tmpl, CK_ULONG pub_count, CK_ATTRIBUTE *priv_tmpl,
      CK_ULONG priv_count, CK_OBJECT_HANDLE *pub, CK_OBJECT_HANDLE *priv),
     (s, m, pub_tmpl, pub_count, priv_tmpl, priv_count, pub, priv))
WRAP(C_WrapKey,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE wrapping, CK_OBJECT_HANDLE key, CK_BYTE *out,
      CK_ULONG *out_len),
     (s, m, wrapping, key, out, out_len))
WRAP(C_UnwrapKey,
     (CK_SESSION_HANDLE s, CK_MECHANISM *m, CK_OBJECT_HANDLE unwrapping, CK_BYTE *in, CK_ULONG in_len,
      CK_ATTRIBUTE *tmpl, CK_ULONG count, CK_OBJECT_HANDLE *key),
     (s, m, unwrapping, in, in_len, tmpl, count, key))
WRAP(C_GenerateRandom, (CK_SESSION_HANDLE s, CK_BYTE *out, CK_ULONG len), (s, out, len))

/* The wrapped functions: symbol name, where the real entry is saved, the wrapper. */
#define ENTRY(name) {#name, &real_##name, (CK_GENERIC_FN)fault_##name}
static const struct {
    const char *symbol;
    CK_GENERIC_FN *real;
    CK_GENERIC_FN wrapper;
} wrapped[] = {
    ENTRY(C_OpenSession),     ENTRY(C_Login),         ENTRY(C_GetAttributeValue), ENTRY(C_DestroyObject),
    ENTRY(C_FindObjectsInit), ENTRY(C_EncryptInit),   ENTRY(C_Encrypt),           ENTRY(C_DecryptInit),
    ENTRY(C_Decrypt),         ENTRY(C_SignInit),      ENTRY(C_Sign),              ENTRY(C_GenerateKey),
    ENTRY(C_GenerateKeyPair), ENTRY(C_WrapKey),       ENTRY(C_UnwrapKey),         ENTRY(C_GenerateRandom),
};

/* ---- Loading the real module ------------------------------------------------------------------------ */

static CK_FUNCTION_LIST function_list; /* the copy handed out */
static CK_RV load_rv = CKR_GENERAL_ERROR;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;

CK_RV C_GetFunctionList(CK_FUNCTION_LIST **list);

/* Returns the index of `symbol`'s entry in the real list, or -1 (message on stderr). */
static int find_entry(void *real, const CK_FUNCTION_LIST *real_list, const char *symbol)
{
    void *address = dlsym(real, symbol);
    int i;

    if (address == NULL) {
        fprintf(stderr, "faulty_pkcs11: the real module does not export %s\n", symbol);
        return -1;
    }
    for (i = 0; i < FUNCTION_COUNT; i++)
        if ((void *)real_list->fn[i] == address)
            return i;
    fprintf(stderr, "faulty_pkcs11: %s is not in the real module's function list\n", symbol);
    return -1;
}

static void load_real_module(void)
{
    const char *path = getenv("KMSQ_FAULT_REAL_MODULE");
    CK_RV (*real_get_function_list)(CK_FUNCTION_LIST **);
    CK_FUNCTION_LIST *real_list = NULL;
    void *real;
    size_t w;
    int i;

    fault_file = getenv("KMSQ_FAULT_FILE");
    if (fault_file != NULL && (fault_file = strdup(fault_file)) == NULL)
        return;
    if (path == NULL || *path == '\0') {
        fprintf(stderr, "faulty_pkcs11: KMSQ_FAULT_REAL_MODULE is not set\n");
        return;
    }
    /* RTLD_LOCAL: the real module's symbols stay out of the global scope (and out of ours). */
    if ((real = dlopen(path, RTLD_NOW | RTLD_LOCAL)) == NULL) {
        fprintf(stderr, "faulty_pkcs11: cannot load %s: %s\n", path, dlerror());
        return;
    }
    real_get_function_list = (CK_RV(*)(CK_FUNCTION_LIST **))dlsym(real, "C_GetFunctionList");
    if (real_get_function_list == NULL) {
        fprintf(stderr, "faulty_pkcs11: %s has no C_GetFunctionList\n", path);
        return;
    }
    if ((load_rv = real_get_function_list(&real_list)) != CKR_OK)
        return;
    if (real_list == NULL) {
        load_rv = CKR_GENERAL_ERROR;
        return;
    }
    function_list = *real_list;
    /* Callers that ask the list for C_GetFunctionList get this module's list again. */
    if ((i = find_entry(real, real_list, "C_GetFunctionList")) < 0) {
        load_rv = CKR_GENERAL_ERROR;
        return;
    }
    function_list.fn[i] = (CK_GENERIC_FN)C_GetFunctionList;
    for (w = 0; w < sizeof wrapped / sizeof wrapped[0]; w++) {
        if ((i = find_entry(real, real_list, wrapped[w].symbol)) < 0) {
            load_rv = CKR_GENERAL_ERROR; /* refuse rather than silently not inject a fault */
            return;
        }
        *wrapped[w].real = real_list->fn[i];
        function_list.fn[i] = wrapped[w].wrapper;
    }
    load_rv = CKR_OK; /* the real module stays loaded for the life of the process */
}

/* The module's only export: loads the real module once, then returns the wrapped function list. */
__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST **list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pthread_once(&load_once, load_real_module) != 0)
        return CKR_GENERAL_ERROR;
    if (load_rv != CKR_OK)
        return load_rv;
    *list = &function_list;
    return CKR_OK;
}
