/*
 * parent_watch.c - forks and execs a target, then records everything the
 * parent can learn about its child stopping or continuing: SIGCHLD (with its
 * si_code) and waitpid(WUNTRACED|WCONTINUED) reports. A freeze that is
 * invisible to the parent leaves all counters at zero.
 *
 * Usage: parent_watch TARGET_EXE [ARGS...]
 * Commands on stdin, replies on stdout (the child keeps CP_CTL_FD/CP_OUT_FD,
 * which parent_watch closes in itself so the child sees EOF when the harness goes):
 *   ready child_pid=N watch_pid=N                          (sent after the fork)
 *   status -> status sigchld=N wait_stopped=N wait_continued=N child_gone=0|1
 *             events=[sigchld:stopped,wait:stopped:19,wait:continued,...]
 *   quit   -> SIGKILLs and reaps the child, replies "bye", exits 0.
 * EOF on stdin, SIGTERM, SIGINT, SIGHUP: same as quit (no reply).
 * The child gets PR_SET_PDEATHSIG=SIGKILL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t child;
static int child_gone;
static long sigchld, wait_stopped, wait_continued;
static char events[16384];

static void event(const char *fmt, ...)
{
    char one[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(one, sizeof one, fmt, ap);
    va_end(ap);
    size_t len = strlen(events);
    if (len + strlen(one) + 2 < sizeof events)
        snprintf(events + len, sizeof events - len, "%s%s", len ? "," : "", one);
}

static void say(const char *line)
{
    size_t n = strlen(line);
    if (write(1, line, n) != (ssize_t)n)
        exit(0); /* harness went away */
}

static void collect(int options)
{
    int st;
    while (!child_gone) {
        pid_t r = waitpid(child, &st, options | WUNTRACED | WCONTINUED);
        if (r <= 0)
            return;
        if (WIFSTOPPED(st)) {
            wait_stopped++;
            event("wait:stopped:%d", WSTOPSIG(st));
        } else if (WIFCONTINUED(st)) {
            wait_continued++;
            event("wait:continued");
        } else if (WIFEXITED(st)) {
            child_gone = 1;
            event("wait:exited:%d", WEXITSTATUS(st));
        } else if (WIFSIGNALED(st)) {
            child_gone = 1;
            event("wait:killed:%d", WTERMSIG(st));
        }
    }
}

static void finish(int reply)
{
    if (!child_gone) {
        kill(child, SIGKILL);
        while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    if (reply)
        say("bye\n");
    exit(0);
}

static void on_sigchld(int sig) { (void)sig; }

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: parent_watch TARGET_EXE [ARGS...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = { .sa_handler = on_sigchld }; /* no SA_NOCLDSTOP: stops notify */
    sigaction(SIGCHLD, &sa, NULL);
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, &old);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    if (sfd < 0) {
        perror("signalfd");
        return 2;
    }

    pid_t me = getpid();
    child = fork();
    if (child < 0) {
        perror("fork");
        return 2;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        signal(SIGCHLD, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != me)
            _exit(1);
        execv(argv[1], argv + 1);
        fprintf(stderr, "parent_watch: exec %s: %s\n", argv[1], strerror(errno));
        _exit(127);
    }
    const char *e;
    if ((e = getenv("CP_CTL_FD")))
        close(atoi(e));
    if ((e = getenv("CP_OUT_FD")))
        close(atoi(e));

    char line[256], buf[4096];
    size_t len = 0;
    snprintf(line, sizeof line, "ready child_pid=%d watch_pid=%d\n", (int)child, (int)me);
    say(line);
    for (;;) {
        struct pollfd pfd[2] = { { 0, POLLIN, 0 }, { sfd, POLLIN, 0 } };
        poll(pfd, 2, 50); /* the timeout also catches reports without SIGCHLD */
        if (pfd[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == sizeof si) {
                if (si.ssi_signo != SIGCHLD)
                    finish(0);
                static const char *code[] = { "?",       "exited",  "killed",   "dumped",
                                              "trapped", "stopped", "continued" };
                int c = si.ssi_code;
                sigchld++;
                event("sigchld:%s", c >= CLD_EXITED && c <= CLD_CONTINUED ? code[c] : "other");
            }
        }
        collect(WNOHANG);
        if (pfd[0].revents & (POLLIN | POLLHUP)) {
            ssize_t n = read(0, buf + len, sizeof buf - 1 - len);
            if (n <= 0) {
                if (n < 0 && errno == EINTR)
                    continue;
                finish(0);
            }
            len += (size_t)n;
            buf[len] = 0;
            char *nl;
            while ((nl = strchr(buf, '\n'))) {
                *nl = 0;
                if (!strcmp(buf, "status")) {
                    char out[sizeof events + 256];
                    snprintf(out, sizeof out,
                             "status sigchld=%ld wait_stopped=%ld wait_continued=%ld child_gone=%d events=[%s]\n",
                             sigchld, wait_stopped, wait_continued, child_gone, events);
                    say(out);
                } else if (!strcmp(buf, "quit")) {
                    finish(1);
                } else {
                    say("error unknown-command\n");
                }
                len -= (size_t)(nl + 1 - buf);
                memmove(buf, nl + 1, len + 1);
            }
            if (len == sizeof buf - 1)
                len = 0;
        }
    }
}
