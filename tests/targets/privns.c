/*
 * privns.c - a target whose threads run in a shared library (privlib.c).
 *
 * Usage: privns WORKERS [UNLINK_PATH...]   (run it inside a private mount
 * namespace; each UNLINK_PATH, e.g. its library, is deleted once loaded)
 * Protocol: see cp_common.c. Ready line adds workers=N heap_addr=0x..
 *   heap_len=N; byte i of the heap buffer is (i*151+7)%251.
 * Built by the test with -lprivlib (not by build_target).
 */
#include "cp_common.c"

#define HEAP_LEN (64 * 1024 * 1024)

extern void *priv_worker(void *note);
static unsigned char *heap;

static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd; (void)reply; (void)n;
    return 0;
}

static void target_status(char *buf, size_t n) { snprintf(buf, n, "workers=ok"); }
static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 0;
    if (workers <= 0 || workers > 64)
        cp_die("usage: privns WORKERS [UNLINK_PATH...]");
    for (int i = 2; i < argc; i++)
        if (unlink(argv[i]))
            cp_die("unlink %s: %s", argv[i], strerror(errno));
    cp_init();
    heap = malloc(HEAP_LEN);
    if (!heap)
        cp_die("malloc failed");
    for (size_t i = 0; i < HEAP_LEN; i++)
        heap[i] = (unsigned char)((i * 151 + 7) % 251);
    for (int i = 0; i < workers; i++)
        cp_spawn(priv_worker, (void *)cp_note_eintr, "priv_worker", 0);
    cp_wait_arrivals(CP_COMMON_THREADS);
    cp_ready("workers=%d heap_addr=0x%lx heap_len=%d", workers,
             (unsigned long)(uintptr_t)heap, HEAP_LEN);
    cp_control_loop();
    return 0;
}
