/*
 * eintr_probe.c - threads in the syscalls that signal(7) says fail with EINTR
 * after any stop (even without a handler): epoll_wait, semop, semtimedop,
 * sigtimedwait, recv with SO_RCVTIMEO. Each probe counts its EINTRs and its
 * normal returns; the EINTRs are expected and are NOT added to the common
 * "eintr" counter (which still guards the heartbeat, signalfd and control read).
 *
 * Usage: eintr_probe
 * Protocol: see cp_common.c. Ready line adds semid=N tid_epoll= tid_semop=
 *   tid_semtimedop= tid_sigtimedwait= tid_recv=
 *   (the SysV semaphore set is removed on a clean exit; after SIGKILL the
 *   harness removes semid).
 * Extra command: "wake" - makes every probe return normally once; replies
 *   "woke epoll=ok semop=ok semtimedop=ok sigtimedwait=ok recv=ok" (or timeout).
 * Extra status: <probe>_eintr=N <probe>_ok=N for each probe, probe_other=N.
 *
 * One more thread sits in poll() on a pipe nobody writes, with a 1 s timeout,
 * the case signal(7) says is NOT interrupted by a stop and keeps its deadline:
 *   poll_eintr=N poll_timeouts=N poll_start_us=T (CLOCK_MONOTONIC start of the
 *   current call) poll_last_start_us=T poll_last_end_us=T (the last finished one).
 */
#include "cp_common.c"
#include <poll.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/socket.h>

enum { P_EPOLL, P_SEMOP, P_SEMTIMEDOP, P_SIGTIMEDWAIT, P_RECV, P_COUNT };
static const char *probe_names[P_COUNT] = { "epoll", "semop", "semtimedop", "sigtimedwait", "recv" };
static atomic_long probe_eintr[P_COUNT], probe_ok[P_COUNT], probe_other;
static pid_t probe_tid[P_COUNT];
static int epfd, ep_pipe[2], socks[2], semid = -1, poll_pipe[2];
static atomic_long poll_eintr, poll_timeouts, poll_start_us, poll_last_start_us, poll_last_end_us;
static pid_t poll_tid;

#define POLL_TIMEOUT_MS 1000

/* Count one return of probe p: rc >= 0 is normal, -1/EINTR is the expected failure. */
static void probe_result(int p, long rc)
{
    if (rc >= 0)
        atomic_fetch_add(&probe_ok[p], 1);
    else if (errno == EINTR)
        atomic_fetch_add(&probe_eintr[p], 1);
    else
        atomic_fetch_add(&probe_other, 1);
}

static void *cp_probe_epoll(void *arg)
{
    (void)arg;
    cp_arrive(&probe_tid[P_EPOLL]);
    for (;;) {
        struct epoll_event ev;
        int rc = epoll_wait(epfd, &ev, 1, -1);
        char c;
        if (rc == 1 && read(ep_pipe[0], &c, 1) != 1)
            atomic_fetch_add(&probe_other, 1);
        probe_result(P_EPOLL, rc);
    }
    return NULL;
}

static void *cp_probe_semop(void *arg)
{
    (void)arg;
    cp_arrive(&probe_tid[P_SEMOP]);
    for (;;) {
        struct sembuf op = { 0, -1, 0 };
        probe_result(P_SEMOP, semop(semid, &op, 1));
    }
    return NULL;
}

static void *cp_probe_semtimedop(void *arg)
{
    (void)arg;
    cp_arrive(&probe_tid[P_SEMTIMEDOP]);
    for (;;) {
        struct sembuf op = { 1, -1, 0 };
        struct timespec ts = { 3600, 0 };
        probe_result(P_SEMTIMEDOP, semtimedop(semid, &op, 1, &ts));
    }
    return NULL;
}

static void *cp_probe_sigtimedwait(void *arg)
{
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMAX); /* blocked in every thread by cp_init() */
    cp_arrive(&probe_tid[P_SIGTIMEDWAIT]);
    for (;;) {
        struct timespec ts = { 3600, 0 };
        probe_result(P_SIGTIMEDWAIT, sigtimedwait(&set, NULL, &ts));
    }
    return NULL;
}

static void *cp_probe_recv(void *arg)
{
    (void)arg;
    cp_arrive(&probe_tid[P_RECV]);
    for (;;) {
        char c;
        probe_result(P_RECV, recv(socks[0], &c, 1, 0));
    }
    return NULL;
}

static void *cp_probe_poll(void *arg)
{
    (void)arg;
    cp_arrive(&poll_tid);
    for (;;) {
        struct pollfd pfd = { .fd = poll_pipe[0], .events = POLLIN };
        long start = cp_now_us();
        atomic_store(&poll_start_us, start);
        int rc = poll(&pfd, 1, POLL_TIMEOUT_MS);
        long end = cp_now_us();
        if (rc == 0)
            atomic_fetch_add(&poll_timeouts, 1);
        else if (rc < 0 && errno == EINTR)
            atomic_fetch_add(&poll_eintr, 1);
        else
            atomic_fetch_add(&probe_other, 1);
        atomic_store(&poll_last_start_us, start);
        atomic_store(&poll_last_end_us, end);
    }
    return NULL;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    if (strcmp(cmd, "wake"))
        return 0;
    long before[P_COUNT];
    for (int p = 0; p < P_COUNT; p++)
        before[p] = atomic_load(&probe_ok[p]);
    struct sembuf ops[2] = { { 0, 1, 0 }, { 1, 1, 0 } };
    if (write(ep_pipe[1], "w", 1) != 1 || semop(semid, ops, 2) ||
        tgkill(getpid(), probe_tid[P_SIGTIMEDWAIT], SIGRTMAX) || send(socks[1], "w", 1, 0) != 1)
        cp_note_unexpected("probe-wake");
    long deadline = cp_now_us() + 3000000;
    snprintf(reply, n, "woke");
    for (int p = 0; p < P_COUNT; p++) {
        while (atomic_load(&probe_ok[p]) == before[p] && cp_now_us() < deadline)
            cp_sleep_us(1000);
        cp_appendf(reply, n, " %s=%s", probe_names[p],
                   atomic_load(&probe_ok[p]) != before[p] ? "ok" : "timeout");
        cp_wait_state(probe_tid[p], "S");
    }
    return 1;
}

static void target_status(char *buf, size_t n)
{
    for (int p = 0; p < P_COUNT; p++)
        cp_appendf(buf, n, "%s_eintr=%ld %s_ok=%ld ", probe_names[p], atomic_load(&probe_eintr[p]),
                   probe_names[p], atomic_load(&probe_ok[p]));
    cp_appendf(buf, n, "poll_eintr=%ld poll_timeouts=%ld poll_start_us=%ld poll_last_start_us=%ld "
               "poll_last_end_us=%ld ", atomic_load(&poll_eintr), atomic_load(&poll_timeouts),
               atomic_load(&poll_start_us), atomic_load(&poll_last_start_us),
               atomic_load(&poll_last_end_us));
    cp_appendf(buf, n, "probe_other=%ld", atomic_load(&probe_other));
}

static void target_cleanup(void)
{
    if (semid >= 0)
        semctl(semid, 0, IPC_RMID);
}

int main(void)
{
    cp_init();
    struct epoll_event ev = { .events = EPOLLIN };
    struct timeval tv = { 3600, 0 };
    if (pipe(ep_pipe) || pipe(poll_pipe) || (epfd = epoll_create1(0)) < 0 ||
        epoll_ctl(epfd, EPOLL_CTL_ADD, ep_pipe[0], &ev) ||
        socketpair(AF_UNIX, SOCK_DGRAM, 0, socks) ||
        setsockopt(socks[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) ||
        (semid = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600)) < 0)
        cp_die("setup failed: %s", strerror(errno));
    cp_spawn(cp_probe_epoll, NULL, "cp_epoll", 0);
    cp_spawn(cp_probe_semop, NULL, "cp_semop", 0);
    cp_spawn(cp_probe_semtimedop, NULL, "cp_semtimedop", 0);
    cp_spawn(cp_probe_sigtimedwait, NULL, "cp_sigtimedwait", 0);
    cp_spawn(cp_probe_recv, NULL, "cp_recv", 0);
    cp_spawn(cp_probe_poll, NULL, "cp_poll", 0);
    cp_wait_arrivals(CP_COMMON_THREADS + P_COUNT + 1);
    for (int p = 0; p < P_COUNT; p++)
        cp_wait_state(probe_tid[p], "S");
    cp_wait_state(poll_tid, "S");
    cp_wait_state(cp_tid_signals, "S");
    cp_ready("semid=%d tid_epoll=%d tid_semop=%d tid_semtimedop=%d tid_sigtimedwait=%d tid_recv=%d",
             semid, (int)probe_tid[P_EPOLL], (int)probe_tid[P_SEMOP], (int)probe_tid[P_SEMTIMEDOP],
             (int)probe_tid[P_SIGTIMEDWAIT], (int)probe_tid[P_RECV]);
    cp_control_loop();
}
