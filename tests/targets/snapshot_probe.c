/*
 * snapshot_probe.c - target for snapshot mode: memory whose content changes
 * on command, memory a fork does not copy, and proof it never sees a child.
 *
 * Usage: snapshot_probe [-m BULK_MIB] [-D DONTFORK_MIB] [-S kill|errno] [-N] [-F FDS]
 *   -m  MiB of private anonymous "bulk" memory, touched (default 4)
 *   -F  open FDS more descriptors (of /dev/null), for fd-table costs
 *   -D  MiB of the MADV_DONTFORK region (default 1)
 *   -S  install a seccomp filter (all threads) answering clone() with
 *       KILL_PROCESS or ERRNO(EPERM); every other call is allowed
 *   -N  become uid/gid 65534 with RLIMIT_NPROC = 1, so clone() fails (EAGAIN)
 * Regions (byte i of a region filled with seed s is (i*151+s)%251):
 *   pat  private anonymous, 1 MiB, seed 1 until "rewrite SEED"
 *   df   MADV_DONTFORK, -D MiB, seed 7     wf  MADV_WIPEONFORK, 1 MiB, seed 9
 *   sh   MAP_SHARED anonymous, 64 KiB, seed 11 until "rewrite"
 * SIGCHLD is blocked in every thread, so a SIGCHLD sent to it stays pending.
 * Protocol: see cp_common.c. Ready line adds pat_addr df_addr df_len wf_addr
 *   wf_len sh_addr sh_len bulk_addr bulk_len region_len.
 * Extra commands:
 *   "rewrite SEED" -> "rewrote seed=SEED" (pat and sh refilled with SEED)
 *   "waitcheck"    -> "waited nohang=R wait=R wall=R": waitpid(-1, WNOHANG),
 *                     wait(), waitpid(-1, __WALL|WNOHANG); R is the pid returned,
 *                     0, or the errno name (ECHILD)
 *   "closepipe"    -> "closed eof=0|1": closes the write end of a pipe made at
 *                     start; eof=1 if its read end then reads end-of-file (no
 *                     other copy of the write end is open anywhere)
 * Extra status: sigchld_pending=0|1 children=N (from /proc/self/task/x/children)
 */
#include "cp_common.c"
#include <dirent.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define MIB (1024UL * 1024UL)
#define PAT_LEN MIB
#define WF_LEN MIB
#define SH_LEN (64 * 1024UL)

static unsigned char *pat, *df, *wf, *sh, *bulk;
static size_t df_len = MIB, bulk_len = 4 * MIB;
static int probe_pipe[2];

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((i * 151 + seed) % 251);
}

static unsigned char *map_region(size_t len, int flags, int advice, const char *what)
{
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        cp_die("mmap %s: %s", what, strerror(errno));
    if (advice >= 0 && madvise(p, len, advice))
        cp_die("madvise %s: %s", what, strerror(errno));
    return p;
}

static void wait_result(char *out, size_t n, pid_t r)
{
    if (r < 0)
        snprintf(out, n, "%s", errno == ECHILD ? "ECHILD" : strerror(errno));
    else
        snprintf(out, n, "%d", (int)r);
}

static int count_children(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], buf[4096];
        snprintf(path, sizeof path, "/proc/self/task/%s/children", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        ssize_t r = read(fd, buf, sizeof buf - 1);
        close(fd);
        for (ssize_t i = 0; i < r; i++)
            n += buf[i] == ' ';
    }
    closedir(d);
    return n;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    unsigned seed;
    if (sscanf(cmd, "rewrite %u", &seed) == 1) {
        fill(pat, PAT_LEN, seed);
        fill(sh, SH_LEN, seed);
        snprintf(reply, n, "rewrote seed=%u", seed);
        return 1;
    }
    if (!strcmp(cmd, "waitcheck")) {
        char a[32], b[32], c[32];
        int st;
        wait_result(a, sizeof a, waitpid(-1, &st, WNOHANG));
        wait_result(b, sizeof b, wait(&st));
        wait_result(c, sizeof c, waitpid(-1, &st, __WALL | WNOHANG));
        snprintf(reply, n, "waited nohang=%s wait=%s wall=%s", a, b, c);
        return 1;
    }
    if (!strcmp(cmd, "closepipe")) {
        close(probe_pipe[1]);
        char c;
        ssize_t r = read(probe_pipe[0], &c, 1);
        snprintf(reply, n, "closed eof=%d", r == 0);
        return 1;
    }
    return 0;
}

static void target_status(char *buf, size_t n)
{
    sigset_t pending;
    sigpending(&pending);
    snprintf(buf, n, "sigchld_pending=%d children=%d", sigismember(&pending, SIGCHLD),
             count_children());
}

static void target_cleanup(void) {}

static void install_seccomp(const char *how)
{
#ifdef __x86_64__
    const unsigned arch = AUDIT_ARCH_X86_64;
#else
    const unsigned arch = AUDIT_ARCH_I386;
#endif
    unsigned action = !strcmp(how, "kill") ? SECCOMP_RET_KILL_PROCESS
                                           : SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA);
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fprog = { sizeof prog / sizeof prog[0], prog };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        cp_die("no_new_privs: %s", strerror(errno));
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog))
        cp_die("seccomp: %s", strerror(errno));
}

/* Before any thread exists: glibc's set*id() signals every thread (EINTR). */
static void become_nobody(void)
{
    if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
        cp_die("setresuid: %s", strerror(errno));
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0); /* setuid made it non-dumpable */
}

/* Once every thread exists: no further process or thread may be created. */
static void forbid_processes(void)
{
    struct rlimit rl = { 1, 1 };
    if (setrlimit(RLIMIT_NPROC, &rl))
        cp_die("setrlimit: %s", strerror(errno));
}

int main(int argc, char **argv)
{
    const char *seccomp_how = NULL;
    int nobody = 0, opt;
    long fds = 0;
    while ((opt = getopt(argc, argv, "m:D:S:NF:")) != -1) {
        switch (opt) {
        case 'm': bulk_len = strtoul(optarg, NULL, 0) * MIB; break;
        case 'D': df_len = strtoul(optarg, NULL, 0) * MIB; break;
        case 'S': seccomp_how = optarg; break;
        case 'N': nobody = 1; break;
        case 'F': fds = atol(optarg); break;
        default: cp_die("usage: snapshot_probe [-m MIB] [-D MIB] [-S kill|errno] [-N] [-F FDS]");
        }
    }
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL); /* inherited by every thread */
    if (nobody)
        become_nobody();
    cp_init();
    if (pipe(probe_pipe) || fcntl(probe_pipe[0], F_SETFL, O_NONBLOCK))
        cp_die("pipe: %s", strerror(errno));
    if (fds > 0) {
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)fds + 64 && rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = (rlim_t)fds + 64 < rl.rlim_max ? (rlim_t)fds + 64 : rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        for (long i = 0; i < fds; i++)
            if (open("/dev/null", O_RDONLY) < 0)
                cp_die("open: %s", strerror(errno));
    }
    pat = map_region(PAT_LEN, MAP_PRIVATE, -1, "pat");
    df = map_region(df_len, MAP_PRIVATE, MADV_DONTFORK, "df");
    wf = map_region(WF_LEN, MAP_PRIVATE, MADV_WIPEONFORK, "wf");
    sh = map_region(SH_LEN, MAP_SHARED, -1, "sh");
    fill(pat, PAT_LEN, 1);
    fill(df, df_len, 7);
    fill(wf, WF_LEN, 9);
    fill(sh, SH_LEN, 11);
    if (bulk_len) {
        bulk = map_region(bulk_len, MAP_PRIVATE, -1, "bulk");
        fill(bulk, bulk_len, 3);
    }
    cp_wait_arrivals(CP_COMMON_THREADS);
    cp_wait_state(cp_tid_signals, "S");
    if (seccomp_how)
        install_seccomp(seccomp_how);
    if (nobody)
        forbid_processes();
    cp_ready("pat_addr=0x%lx df_addr=0x%lx df_len=%zu wf_addr=0x%lx wf_len=%lu sh_addr=0x%lx "
             "sh_len=%lu bulk_addr=0x%lx bulk_len=%zu region_len=%lu",
             (unsigned long)(uintptr_t)pat, (unsigned long)(uintptr_t)df, df_len,
             (unsigned long)(uintptr_t)wf, WF_LEN, (unsigned long)(uintptr_t)sh, SH_LEN,
             (unsigned long)(uintptr_t)bulk, bulk_len, PAT_LEN);
    cp_control_loop();
}
