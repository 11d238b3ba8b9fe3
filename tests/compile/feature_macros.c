/* flash.h as the first include of an implementing file that chose no
   feature-test macro: the rest of the file must still see the POSIX and
   glibc names a gnu11 build sees (flash.h once defined _POSIX_C_SOURCE
   alone here, which hid MAP_ANONYMOUS, MAP_STACK, usleep, timegm, ...).
   Built with -std=c11 -Werror by `make headers`, then run. */
#define FLASH_IMPLEMENTATION
#include "flash.h"

#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    size_t n = 64 * 1024;
    void *stack = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    struct tm tm;
    struct addrinfo hints;
    stack_t alt;
    char *copy = strndup("Flash", 3);
    time_t t;
    int ok = stack != MAP_FAILED && copy != NULL;
    if (ok) ok = madvise(stack, n, MADV_DONTNEED) == 0 && munmap(stack, n) == 0;
    memset(&tm, 0, sizeof tm);
    tm.tm_year = 70;
    tm.tm_mday = 1;
    t = timegm(&tm);                      /* _DEFAULT_SOURCE */
    ok = ok && t == 0 && strcasecmp(copy, "FLA") == 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    memset(&alt, 0, sizeof alt);
    alt.ss_flags = SS_DISABLE;
    ok = ok && usleep(1) == 0;            /* gone from POSIX.1-2008, still in glibc */
    ok = ok && flash_strerror(FLASH_ENOTFOUND)[0] != 0;
    free(copy);
    if (!ok) {
        fprintf(stderr, "feature_macros: a POSIX/glibc call failed\n");
        return 1;
    }
    puts("feature macros: an implementing file that includes flash.h first sees MAP_ANONYMOUS, MAP_STACK, timegm, usleep, strndup");
    return 0;
}
