/*
 * heap_stack.c - a thread whose stack lives inside a large heap buffer.
 *
 * Usage: heap_stack
 * Protocol: see cp_common.c. Ready line adds
 *   buf_addr=0x.. buf_len=N stack_addr=0x.. stack_len=N tid_heap=N
 * A 16 MiB malloc'd buffer (its own anonymous mapping) is filled with the byte
 * 'H'; a 64 KiB window 1 MiB into it is the stack of thread "cp_heap_stack",
 * parked in nanosleep.  Everything above that stack in the buffer is heap a
 * stacks capture must not expose beyond its per-thread cap.
 */
#include "cp_common.c"

#define BUF_LEN (16L << 20)
#define STACK_OFF (1L << 20)
#define STACK_LEN (64L << 10)

static unsigned char *buf;
static pid_t tid_heap;

static void *cp_heap_sleeper(void *arg)
{
    (void)arg;
    cp_arrive(&tid_heap);
    for (;;) {
        struct timespec d = { 0, 200000000L };
        cp_check(nanosleep(&d, NULL), "heap-nanosleep");
    }
    return NULL;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd, (void)reply, (void)n;
    return 0;
}

static void target_status(char *out, size_t n) { snprintf(out, n, "heap=ok"); }

static void target_cleanup(void) {}

int main(void)
{
    cp_init();
    buf = malloc(BUF_LEN);
    if (!buf)
        cp_die("malloc failed");
    memset(buf, 'H', BUF_LEN);
    pthread_attr_t attr;
    pthread_t th;
    pthread_attr_init(&attr);
    if (pthread_attr_setstack(&attr, buf + STACK_OFF, STACK_LEN))
        cp_die("pthread_attr_setstack failed");
    if (pthread_create(&th, &attr, cp_heap_sleeper, NULL))
        cp_die("pthread_create failed");
    pthread_setname_np(th, "cp_heap_stack");
    cp_wait_arrivals(CP_COMMON_THREADS + 1);
    cp_wait_state(tid_heap, "S");
    cp_ready("buf_addr=0x%lx buf_len=%ld stack_addr=0x%lx stack_len=%ld tid_heap=%d",
             (unsigned long)(uintptr_t)buf, BUF_LEN,
             (unsigned long)(uintptr_t)(buf + STACK_OFF), STACK_LEN, (int)tid_heap);
    cp_control_loop();
}
