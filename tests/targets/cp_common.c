/*
 * cp_common.c - runtime shared by the corepeek test targets.
 *
 * Not a program: each target does `#include "cp_common.c"` (one translation
 * unit, so the build is a single gcc call) and defines the three hooks
 * target_status(), target_command() and target_cleanup().
 *
 * Protocol (one line per message, fields are key=value, lists are [a,b]):
 *   - commands are read from the fd in env CP_CTL_FD (default 0),
 *   - "ready ..." and every reply are written to env CP_OUT_FD (default 1).
 *   Common commands: "status", "resetgap" (reply: status line), "quit"
 *   (reply "bye", exit 0). Unknown commands get "error unknown-command ...".
 *   EOF on the control fd, SIGTERM, SIGINT or SIGHUP: exit 0.
 *
 * Disturbance detection: every blocking call that must not fail under a
 * ptrace freeze reports EINTR via cp_note_eintr() and any other odd return
 * via cp_note_unexpected(). Signals (SIGUSR1, SIGRTMIN..SIGRTMAX-1) are
 * blocked in every thread and read from a signalfd by one thread, so they
 * never interrupt the other threads' syscalls. SIGRTMAX is blocked but left
 * to the target (eintr_probe waits for it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#define CP_RT_MAX 1024
#define CP_SITES_MAX 16

static void target_status(char *buf, size_t n);
static int target_command(const char *cmd, char *reply, size_t n);
static void target_cleanup(void);

static int cp_ctl_fd = 0, cp_out_fd = 1;
static long cp_heartbeat_us = 10000;
static atomic_long cp_heartbeats, cp_maxgap_us, cp_eintr, cp_unexpected, cp_usr1;
static atomic_int cp_arrived, cp_exiting;
static pid_t cp_tid_main, cp_tid_heartbeat, cp_tid_signals;
static pthread_mutex_t cp_lock = PTHREAD_MUTEX_INITIALIZER;
static int cp_rt[CP_RT_MAX], cp_rt_n;
static long cp_rt_dropped;
static const char *cp_sites[CP_SITES_MAX];
static int cp_sites_n;
static char cp_buf[65536]; /* only the main thread formats replies */

static void cp_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "target %d: ", (int)getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    _exit(2);
}

static long cp_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000L + ts.tv_nsec / 1000;
}

static void cp_sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void cp_note_site(const char *site)
{
    pthread_mutex_lock(&cp_lock);
    int known = 0;
    for (int i = 0; i < cp_sites_n; i++)
        known |= strcmp(cp_sites[i], site) == 0;
    if (!known && cp_sites_n < CP_SITES_MAX)
        cp_sites[cp_sites_n++] = site;
    pthread_mutex_unlock(&cp_lock);
}

/* A call that must survive a freeze returned EINTR. */
static void cp_note_eintr(const char *site)
{
    atomic_fetch_add(&cp_eintr, 1);
    cp_note_site(site);
}

/* A call that must survive a freeze returned something else it should not. */
static void cp_note_unexpected(const char *site)
{
    atomic_fetch_add(&cp_unexpected, 1);
    cp_note_site(site);
}

/* Classify a -1/errno style result of a blocking call; returns 1 if ok. */
static int cp_check(long ret, const char *site)
{
    if (ret != -1)
        return 1;
    if (errno == EINTR)
        cp_note_eintr(site);
    else
        cp_note_unexpected(site);
    return 0;
}

static void cp_exit(int code)
{
    if (atomic_exchange(&cp_exiting, 1))
        for (;;)
            pause(); /* another thread is already exiting */
    target_cleanup();
    _exit(code);
}

static void cp_write_all(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(cp_out_fd, s, n);
        if (w < 0 && errno == EINTR) {
            cp_note_eintr("write-out");
            continue;
        }
        if (w <= 0)
            cp_exit(0); /* harness went away */
        s += w;
        n -= (size_t)w;
    }
}

/* Append printf-style text to buf (length-safe). */
static void cp_appendf(char *buf, size_t n, const char *fmt, ...)
{
    size_t len = strlen(buf);
    if (len + 1 >= n)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + len, n - len, fmt, ap);
    va_end(ap);
}

static void cp_reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cp_buf, sizeof cp_buf - 1, fmt, ap);
    va_end(ap);
    strcat(cp_buf, "\n");
    cp_write_all(cp_buf, strlen(cp_buf));
}

/* Record the calling thread's tid in *slot and count it as arrived. */
static void cp_arrive(pid_t *slot)
{
    *slot = gettid();
    atomic_fetch_add(&cp_arrived, 1);
}

static void cp_wait_arrivals(int n)
{
    long deadline = cp_now_us() + 10000000L;
    while (atomic_load(&cp_arrived) < n)
        if (cp_now_us() > deadline)
            cp_die("only %d of %d threads started", atomic_load(&cp_arrived), n);
        else
            cp_sleep_us(1000);
}

static char cp_thread_state(pid_t tid)
{
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return '?';
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0)
        return '?';
    stat[n] = 0;
    char *p = strrchr(stat, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

/* Wait until thread tid sleeps in the kernel (state in `states`, e.g. "S"). */
static void cp_wait_state(pid_t tid, const char *states)
{
    long deadline = cp_now_us() + 10000000L;
    while (!strchr(states, cp_thread_state(tid)))
        if (cp_now_us() > deadline)
            cp_die("thread %d never reached state %s (is %c)", (int)tid, states,
                   cp_thread_state(tid));
        else
            cp_sleep_us(1000);
}

static pthread_t cp_spawn(void *(*fn)(void *), void *arg, const char *name, size_t stack)
{
    pthread_attr_t attr;
    pthread_t th;
    pthread_attr_init(&attr);
    if (stack)
        pthread_attr_setstacksize(&attr, stack);
    int rc = pthread_create(&th, &attr, fn, arg);
    if (rc)
        cp_die("pthread_create(%s): %s", name, strerror(rc));
    pthread_attr_destroy(&attr);
    pthread_setname_np(th, name);
    return th;
}

/* Ticks every cp_heartbeat_us; records the longest gap between ticks. */
static void *cp_heartbeat(void *arg)
{
    (void)arg;
    cp_arrive(&cp_tid_heartbeat);
    long prev = cp_now_us();
    for (;;) {
        struct timespec d = { cp_heartbeat_us / 1000000, (cp_heartbeat_us % 1000000) * 1000 };
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &d, NULL);
        if (rc == EINTR)
            cp_note_eintr("heartbeat");
        else if (rc)
            cp_note_unexpected("heartbeat");
        long now = cp_now_us();
        if (now - prev > atomic_load(&cp_maxgap_us))
            atomic_store(&cp_maxgap_us, now - prev);
        prev = now;
        atomic_fetch_add(&cp_heartbeats, 1);
    }
    return NULL;
}

/* Reads every handled signal from a signalfd, in queue order. */
static void *cp_signals(void *arg)
{
    int fd = (int)(intptr_t)arg;
    struct signalfd_siginfo si[16];
    cp_arrive(&cp_tid_signals);
    for (;;) {
        ssize_t n = read(fd, si, sizeof si);
        if (!cp_check(n, "signalfd"))
            continue;
        for (size_t i = 0; i < (size_t)n / sizeof si[0]; i++) {
            int sig = (int)si[i].ssi_signo;
            if (sig == SIGUSR1) {
                atomic_fetch_add(&cp_usr1, 1);
            } else if (sig >= SIGRTMIN && sig < SIGRTMAX) {
                pthread_mutex_lock(&cp_lock);
                if (cp_rt_n < CP_RT_MAX)
                    cp_rt[cp_rt_n++] = si[i].ssi_int;
                else
                    cp_rt_dropped++;
                pthread_mutex_unlock(&cp_lock);
            } else {
                cp_exit(0); /* SIGTERM, SIGINT, SIGHUP */
            }
        }
    }
    return NULL;
}

/* Call first in main(): fds from env, signal mask, heartbeat + signal threads. */
static void cp_init(void)
{
    const char *e;
    if ((e = getenv("CP_CTL_FD")))
        cp_ctl_fd = atoi(e);
    if ((e = getenv("CP_OUT_FD")))
        cp_out_fd = atoi(e);
    cp_tid_main = gettid();
    signal(SIGPIPE, SIG_IGN);

    sigset_t all, handled;
    sigemptyset(&all);
    sigaddset(&all, SIGUSR1);
    sigaddset(&all, SIGTERM);
    sigaddset(&all, SIGINT);
    sigaddset(&all, SIGHUP);
    for (int s = SIGRTMIN; s <= SIGRTMAX; s++)
        sigaddset(&all, s);
    handled = all;
    sigdelset(&handled, SIGRTMAX);
    if (pthread_sigmask(SIG_BLOCK, &all, NULL))
        cp_die("pthread_sigmask failed");
    int sfd = signalfd(-1, &handled, SFD_CLOEXEC);
    if (sfd < 0)
        cp_die("signalfd: %s", strerror(errno));
    cp_spawn(cp_heartbeat, NULL, "cp_heartbeat", 0);
    cp_spawn(cp_signals, (void *)(intptr_t)sfd, "cp_signals", 0);
}

/* Number of threads cp_init() started (for cp_wait_arrivals). */
#define CP_COMMON_THREADS 2

static void cp_ready(const char *fmt, ...)
{
    char fields[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fields, sizeof fields, fmt, ap);
    va_end(ap);
    cp_reply("ready pid=%d tid_main=%d tid_heartbeat=%d tid_signals=%d heartbeat_us=%ld %s",
             (int)getpid(), (int)cp_tid_main, (int)cp_tid_heartbeat, (int)cp_tid_signals,
             cp_heartbeat_us, fields);
}

static void cp_status(void)
{
    char target[8192] = "";
    target_status(target, sizeof target);
    pthread_mutex_lock(&cp_lock);
    char rt[CP_RT_MAX * 12 + 4] = "", sites[CP_SITES_MAX * 32] = "";
    for (int i = 0; i < cp_rt_n; i++)
        cp_appendf(rt, sizeof rt, "%s%d", i ? "," : "", cp_rt[i]);
    for (int i = 0; i < cp_sites_n; i++)
        cp_appendf(sites, sizeof sites, "%s%s", i ? "," : "", cp_sites[i]);
    long dropped = cp_rt_dropped;
    pthread_mutex_unlock(&cp_lock);
    cp_reply("status heartbeat=%ld maxgap_us=%ld eintr=%ld unexpected=%ld disturbed_at=[%s] "
             "usr1=%ld rt=[%s] rt_dropped=%ld %s",
             atomic_load(&cp_heartbeats), atomic_load(&cp_maxgap_us), atomic_load(&cp_eintr),
             atomic_load(&cp_unexpected), sites, atomic_load(&cp_usr1), rt, dropped, target);
}

static void cp_handle(char *line)
{
    char reply[8192] = "";
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\r' || line[n - 1] == ' '))
        line[--n] = 0;
    if (!strcmp(line, "status")) {
        cp_status();
    } else if (!strcmp(line, "resetgap")) {
        atomic_store(&cp_maxgap_us, 0);
        cp_status();
    } else if (!strcmp(line, "quit")) {
        cp_reply("bye");
        cp_exit(0);
    } else if (target_command(line, reply, sizeof reply)) {
        cp_reply("%s", reply);
    } else {
        cp_reply("error unknown-command cmd=%s", line);
    }
}

/* The main thread ends here: blocked in read() on the control fd. */
static void cp_control_loop(void)
{
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(cp_ctl_fd, buf + len, sizeof buf - 1 - len);
        if (!cp_check(n, "control-read"))
            continue;
        if (n == 0)
            cp_exit(0);
        len += (size_t)n;
        buf[len] = 0;
        char *nl;
        while ((nl = strchr(buf, '\n'))) {
            *nl = 0;
            cp_handle(buf);
            len -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, len + 1);
        }
        if (len == sizeof buf - 1)
            len = 0; /* overlong line: drop it */
    }
}
