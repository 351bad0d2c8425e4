/*
 * threads.c - multi-threaded target with threads parked in known syscalls.
 *
 * Usage: threads [SLEEP_MS]   (nanosleep chunk of the sleeper, default 200)
 * Protocol: see cp_common.c. Ready line adds
 *   pattern_addr=0x.. pattern_len=N heap_addr=0x.. heap_len=N sleep_ms=N
 *   tid_sleeper= tid_reader= tid_waiter= tid_spinner=
 * Byte i of the global buffer is (i*151+1)%251, of the heap buffer (i*151+2)%251.
 * Extra command: "wake" - feeds the pipe reader, signals the condvar, waits
 *   for the next nanosleep chunk; replies "woke nanosleep=ok|timeout
 *   pipe=ok|timeout cond=ok|timeout" (ok = the call returned normally).
 * Extra status: sleeps_ok sleeps_short pipe_reads cond_wakes cond_spurious spins
 */
#include "cp_common.c"
#include <sched.h>

#define PATTERN_LEN 4096
#define HEAP_LEN 65536

unsigned char cp_pattern[PATTERN_LEN];
static unsigned char *cp_heap;
static long sleep_ms = 200;
static int wake_pipe[2];
static pthread_mutex_t cv_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long cv_gen;
static pid_t tid_sleeper, tid_reader, tid_waiter, tid_spinner;
static atomic_long sleeps_ok, sleeps_short, pipe_reads, cond_wakes, cond_spurious, spins;

static void fill_pattern(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((i * 151 + seed) % 251);
}

/* Sleeps in SLEEP_MS chunks; each chunk must end at its deadline, not early. */
static void *cp_sleeper_nanosleep(void *arg)
{
    (void)arg;
    cp_arrive(&tid_sleeper);
    for (;;) {
        struct timespec req = { sleep_ms / 1000, (sleep_ms % 1000) * 1000000L }, rem;
        long t0 = cp_now_us();
        if (!cp_check(nanosleep(&req, &rem), "nanosleep"))
            continue;
        if (cp_now_us() - t0 < sleep_ms * 1000) {
            atomic_fetch_add(&sleeps_short, 1);
            cp_note_unexpected("nanosleep-short");
        } else {
            atomic_fetch_add(&sleeps_ok, 1);
        }
    }
    return NULL;
}

/* Blocks in read() on a pipe that only "wake" writes to. */
static void *cp_reader_pipe(void *arg)
{
    (void)arg;
    cp_arrive(&tid_reader);
    for (;;) {
        char c;
        ssize_t n = read(wake_pipe[0], &c, 1);
        if (!cp_check(n, "pipe-read"))
            continue;
        if (n == 1 && c == 'w')
            atomic_fetch_add(&pipe_reads, 1);
        else
            cp_note_unexpected("pipe-read");
    }
    return NULL;
}

/* Blocks in pthread_cond_wait; a wake-up without a new generation is spurious. */
static void *cp_waiter_condvar(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&cv_lock);
    cp_arrive(&tid_waiter);
    long seen = cv_gen;
    for (;;) {
        int rc = pthread_cond_wait(&cv, &cv_lock);
        if (rc)
            cp_note_unexpected("cond-wait");
        if (cv_gen != seen) {
            seen = cv_gen;
            atomic_fetch_add(&cond_wakes, 1);
        } else {
            atomic_fetch_add(&cond_spurious, 1);
        }
    }
    return NULL;
}

/* Burns CPU in user space for ~1 ms, then naps 2 ms (about a third of a core). */
static void *cp_spinner(void *arg)
{
    (void)arg;
    volatile unsigned long counter = 0;
    cp_arrive(&tid_spinner);
    for (;;) {
        long t0 = cp_now_us();
        while (cp_now_us() - t0 < 1000)
            for (int i = 0; i < 10000; i++)
                counter++;
        atomic_fetch_add(&spins, 1);
        struct timespec nap = { 0, 2000000 };
        cp_check(nanosleep(&nap, NULL), "spinner-nap");
        sched_yield();
    }
    return NULL;
}

static const char *waited(atomic_long *counter, long before, long deadline)
{
    while (atomic_load(counter) == before && cp_now_us() < deadline)
        cp_sleep_us(1000);
    return atomic_load(counter) != before ? "ok" : "timeout";
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    if (strcmp(cmd, "wake"))
        return 0;
    long s0 = atomic_load(&sleeps_ok), p0 = atomic_load(&pipe_reads), c0 = atomic_load(&cond_wakes);
    if (write(wake_pipe[1], "w", 1) != 1)
        cp_note_unexpected("wake-write");
    pthread_mutex_lock(&cv_lock);
    cv_gen++;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&cv_lock);
    long deadline = cp_now_us() + sleep_ms * 2000 + 2000000;
    const char *s = waited(&sleeps_ok, s0, deadline);
    const char *p = waited(&pipe_reads, p0, deadline);
    const char *c = waited(&cond_wakes, c0, deadline);
    cp_wait_state(tid_reader, "S"); /* parked again before we answer */
    cp_wait_state(tid_waiter, "S");
    snprintf(reply, n, "woke nanosleep=%s pipe=%s cond=%s", s, p, c);
    return 1;
}

static void target_status(char *buf, size_t n)
{
    snprintf(buf, n,
             "sleeps_ok=%ld sleeps_short=%ld pipe_reads=%ld cond_wakes=%ld cond_spurious=%ld spins=%ld",
             atomic_load(&sleeps_ok), atomic_load(&sleeps_short), atomic_load(&pipe_reads),
             atomic_load(&cond_wakes), atomic_load(&cond_spurious), atomic_load(&spins));
}

static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    if (argc > 1 && (sleep_ms = atol(argv[1])) <= 0)
        cp_die("usage: threads [SLEEP_MS>0]");
    cp_init();
    fill_pattern(cp_pattern, PATTERN_LEN, 1);
    cp_heap = malloc(HEAP_LEN);
    if (!cp_heap || pipe(wake_pipe))
        cp_die("setup failed");
    fill_pattern(cp_heap, HEAP_LEN, 2);
    cp_spawn(cp_sleeper_nanosleep, NULL, "cp_sleeper", 0);
    cp_spawn(cp_reader_pipe, NULL, "cp_reader", 0);
    cp_spawn(cp_waiter_condvar, NULL, "cp_waiter", 0);
    cp_spawn(cp_spinner, NULL, "cp_spinner", 0);
    cp_wait_arrivals(CP_COMMON_THREADS + 4);
    cp_wait_state(tid_sleeper, "S");
    cp_wait_state(tid_reader, "S");
    cp_wait_state(tid_waiter, "S");
    cp_wait_state(cp_tid_signals, "S");
    cp_ready("pattern_addr=0x%lx pattern_len=%d heap_addr=0x%lx heap_len=%d sleep_ms=%ld "
             "tid_sleeper=%d tid_reader=%d tid_waiter=%d tid_spinner=%d",
             (unsigned long)(uintptr_t)cp_pattern, PATTERN_LEN, (unsigned long)(uintptr_t)cp_heap,
             HEAP_LEN, sleep_ms, (int)tid_sleeper, (int)tid_reader, (int)tid_waiter,
             (int)tid_spinner);
    cp_control_loop();
}
