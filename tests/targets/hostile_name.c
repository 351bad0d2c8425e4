/*
 * hostile_name.c - a target whose names try to take over the operator's terminal.
 *
 * Usage: hostile_name (run it from a path with a newline in it for a hostile exe)
 * The main thread (whose name is the process's comm) renames itself to
 * "x\n\x1b[2Jy" (a newline, then ESC[2J: clear screen) with prctl(PR_SET_NAME),
 * and one worker thread "w\x7f\x1b]0;t\a" (DEL, an OSC title sequence).
 * Protocol: see cp_common.c.
 */
#include "cp_common.c"

#include <sys/prctl.h>

#define HOSTILE_COMM "x\n\x1b[2Jy"
#define HOSTILE_THREAD "w\x7f\x1b]0;t\a"

static void *worker(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd; (void)reply; (void)n;
    return 0;
}

static void target_status(char *buf, size_t n) { (void)buf; (void)n; }
static void target_cleanup(void) {}

int main(void)
{
    cp_init();
    int rc = pthread_setname_np(cp_spawn(worker, NULL, "worker", 0), HOSTILE_THREAD);
    if (rc)
        cp_die("pthread_setname_np: %s", strerror(rc));
    if (prctl(PR_SET_NAME, HOSTILE_COMM, 0, 0, 0))
        cp_die("prctl(PR_SET_NAME): %s", strerror(errno));
    cp_ready("");
    cp_control_loop();
    return 0;
}
