/*
 * privlib.c - the shared library of privns.c (not a program, not a cp target).
 *
 * Built by the test into libprivlib.so; its workers park in priv_sleep_deep()
 * so that a debugger's backtrace shows frames of this library by name.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>

typedef void (*priv_note_fn)(const char *site);

__attribute__((noinline)) void priv_sleep_deep(priv_note_fn note)
{
    for (;;) {
        struct timespec req = {0, 20 * 1000 * 1000}, rem;
        while (nanosleep(&req, &rem) != 0) {
            if (errno != EINTR)
                return;
            note("priv-nanosleep");
            req = rem;
        }
    }
}

__attribute__((noinline)) void *priv_worker(void *note)
{
    priv_sleep_deep((priv_note_fn)note);
    return note;
}
