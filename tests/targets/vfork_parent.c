/*
 * vfork_parent.c - a thread sits in vfork() (state D) while its child sleeps.
 *
 * Usage: vfork_parent [CHILD_SECONDS]   (default 3)
 * The child (PR_SET_PDEATHSIG=SIGKILL) reports its pid through a pipe, sleeps
 * CHILD_SECONDS and _exit(0)s; the vforking thread then reaps it and parks.
 * The heartbeat thread keeps ticking meanwhile.
 * Protocol: see cp_common.c. Ready line (sent once the vforker is in D) adds
 *   vfork_tid=N child_pid=N child_seconds=N
 * Extra status: vfork_returned=0|1 child_reaped=0|1 child_status=N (raw wait status)
 */
#include "cp_common.c"
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>

static long child_seconds = 3;
static int started[2];
static pid_t tid_vforker;
static atomic_int vfork_returned, child_reaped, child_status = -1;

static void *cp_vforker(void *arg)
{
    (void)arg;
    pid_t parent = getpid();
    cp_arrive(&tid_vforker);
    pid_t pid = vfork();
    if (pid == 0) {
        /* vfork child: only syscalls, no libc state changes. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        pid_t me = getpid();
        if (write(started[1], &me, sizeof me) != sizeof me)
            _exit(1);
        struct timespec ts = { child_seconds, 0 };
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
            ;
        _exit(0);
    }
    if (pid < 0)
        cp_die("vfork: %s", strerror(errno));
    atomic_store(&vfork_returned, 1);
    int st;
    while (!cp_check(waitpid(pid, &st, 0), "waitpid"))
        ;
    atomic_store(&child_status, st);
    atomic_store(&child_reaped, 1);
    for (;;)
        pause(); /* every signal is blocked: parks for good */
    return NULL;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd, (void)reply, (void)n;
    return 0;
}

static void target_status(char *buf, size_t n)
{
    snprintf(buf, n, "vfork_returned=%d child_reaped=%d child_status=%d",
             atomic_load(&vfork_returned), atomic_load(&child_reaped), atomic_load(&child_status));
}

static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    if (argc > 1 && (child_seconds = atol(argv[1])) <= 0)
        cp_die("usage: vfork_parent [CHILD_SECONDS>0]");
    cp_init();
    if (pipe2(started, O_CLOEXEC))
        cp_die("pipe: %s", strerror(errno));
    cp_spawn(cp_vforker, NULL, "cp_vforker", 0);
    cp_wait_arrivals(CP_COMMON_THREADS + 1);
    struct pollfd pfd = { started[0], POLLIN, 0 };
    pid_t child = 0;
    if (poll(&pfd, 1, 10000) != 1 || read(started[0], &child, sizeof child) != sizeof child)
        cp_die("vfork child never reported");
    cp_wait_state(tid_vforker, "D");
    cp_wait_state(cp_tid_signals, "S");
    cp_ready("vfork_tid=%d child_pid=%d child_seconds=%ld", (int)tid_vforker, (int)child,
             child_seconds);
    cp_control_loop();
}
