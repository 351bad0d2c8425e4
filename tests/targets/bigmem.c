/*
 * bigmem.c - large (possibly sparse) memory, many idle threads, and a fine
 * heartbeat whose longest gap tells how long the process was frozen.
 *
 * Usage: bigmem [-m TOUCH_MIB] [-r RESERVE_MIB] [-t THREADS] [-s] [-H HEARTBEAT_US]
 *   -m  MiB to touch (default 64)       -r  MiB to map, MAP_NORESERVE (default = -m)
 *   -t  extra idle threads (default 0)  -s  spread touched pages evenly over the
 *   -H  heartbeat period (default 1000)     mapping instead of touching its start
 * Every 8-byte word of a touched page holds 0xC0DE000000000000 | (its offset in
 * the mapping); untouched pages read as zeros.
 * Protocol: see cp_common.c. Ready line adds addr=0x.. reserve_bytes=N
 *   touch_bytes=N stride_pages=N page_size=N threads=N.
 * Benchmarks: send "resetgap", freeze, thaw, then "status": maxgap_us is the
 * longest time between two heartbeat ticks.  "fork" -> "forked fork_us=N":
 * one bare fork() (child exits at once), timed in the process.
 */
#include "cp_common.c"
#include <sys/mman.h>
#include <sys/wait.h>

#define MIB (1024UL * 1024UL)

static int idle_pipe[2];
static atomic_int idle_arrived;
static pid_t *idle_tids;

/* Parks in read() on a pipe nobody writes to. */
static void *cp_idle(void *arg)
{
    idle_tids[(intptr_t)arg] = gettid();
    atomic_fetch_add(&idle_arrived, 1);
    for (;;) {
        char c;
        if (cp_check(read(idle_pipe[0], &c, 1), "idle-read"))
            cp_note_unexpected("idle-read");
    }
    return NULL;
}

static void cp_touch(unsigned char *base, size_t off, size_t len)
{
    uint64_t *w = (uint64_t *)(base + off);
    for (size_t i = 0; i < len / 8; i++)
        w[i] = 0xC0DE000000000000ULL | (uint64_t)(off + i * 8);
}

/* "fork": a bare fork() of this process (the child exits at once, the
 * parent reaps it): the page-table copy a snapshot clone also pays.
 * Reply: "forked fork_us=N" (the fork() call alone). */
static int target_command(const char *cmd, char *reply, size_t n)
{
    if (strcmp(cmd, "fork"))
        return 0;
    long t0 = cp_now_us();
    pid_t child = fork();
    long took = cp_now_us() - t0;
    if (child == 0)
        _exit(0);
    if (child > 0)
        waitpid(child, NULL, 0);
    snprintf(reply, n, "forked fork_us=%ld", child > 0 ? took : -1L);
    return 1;
}

static void target_status(char *buf, size_t n)
{
    snprintf(buf, n, "idle_threads=%d", atomic_load(&idle_arrived));
}

static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    unsigned long touch_mib = 64, reserve_mib = 0, threads = 0;
    int spread = 0, opt;
    cp_heartbeat_us = 1000;
    while ((opt = getopt(argc, argv, "m:r:t:sH:")) != -1) {
        switch (opt) {
        case 'm': touch_mib = strtoul(optarg, NULL, 0); break;
        case 'r': reserve_mib = strtoul(optarg, NULL, 0); break;
        case 't': threads = strtoul(optarg, NULL, 0); break;
        case 's': spread = 1; break;
        case 'H': cp_heartbeat_us = atol(optarg); break;
        default: cp_die("usage: bigmem [-m TOUCH_MIB] [-r RESERVE_MIB] [-t THREADS] [-s] [-H US]");
        }
    }
    if (reserve_mib < touch_mib)
        reserve_mib = touch_mib;
    if (cp_heartbeat_us <= 0 || reserve_mib == 0 || reserve_mib > SIZE_MAX / MIB)
        cp_die("bad arguments");
    cp_init();

    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t reserve = reserve_mib * MIB, touch = touch_mib * MIB;
    unsigned char *base = mmap(NULL, reserve, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        cp_die("mmap %lu MiB: %s", reserve_mib, strerror(errno));
    size_t pages = touch / page, stride = spread && pages ? (reserve / page) / pages : 1;
    if (stride <= 1)
        cp_touch(base, 0, touch);
    else
        for (size_t i = 0; i < pages; i++)
            cp_touch(base, i * stride * page, page);

    if (pipe(idle_pipe) || !(idle_tids = calloc(threads + 1, sizeof *idle_tids)))
        cp_die("setup failed: %s", strerror(errno));
    for (unsigned long i = 0; i < threads; i++)
        cp_spawn(cp_idle, (void *)(intptr_t)i, "cp_idle", 256 * 1024);
    cp_wait_arrivals(CP_COMMON_THREADS);
    while ((unsigned long)atomic_load(&idle_arrived) < threads)
        cp_sleep_us(1000);
    for (unsigned long i = 0; i < threads; i++)
        cp_wait_state(idle_tids[i], "S");
    cp_wait_state(cp_tid_signals, "S");
    cp_ready("addr=0x%lx reserve_bytes=%zu touch_bytes=%zu stride_pages=%zu page_size=%zu threads=%lu",
             (unsigned long)(uintptr_t)base, reserve, touch, stride, page, threads);
    cp_control_loop();
}
