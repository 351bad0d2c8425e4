/*
 * churn.c - a target under stress for the reliability tests.
 *
 * Usage: churn [-z] [-n CHURNERS]
 *   -z   zombie group leader: main() hands the control loop to a thread and
 *        calls pthread_exit(), leaving /proc/PID itself a zombie.
 *   -n   threads that create and join short-lived threads in a loop (default 2).
 * Protocol: see cp_common.c. Ready line adds data_addr=0x.. data_len=N.
 * A checker thread keeps rewriting a 1 MiB buffer with a counter-derived
 * pattern and verifies every byte after each rewrite; a mismatch (memory
 * changed under it) counts as check_fail.
 * Extra status: spawned=N checks=N check_fail=N
 */
#include "cp_common.c"

#define DATA_LEN (1 << 20)

unsigned char cp_data[DATA_LEN];
static atomic_long spawned, checks, check_fail;
static int zombie_leader;
static pid_t tid_checker;

static void *cp_short_lived(void *arg)
{
    (void)arg;
    atomic_fetch_add(&spawned, 1);
    return NULL;
}

static void *cp_churner(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_t th;
        if (pthread_create(&th, NULL, cp_short_lived, NULL) == 0)
            pthread_join(th, NULL);
        else
            cp_sleep_us(1000);
    }
    return NULL;
}

static void *cp_checker(void *arg)
{
    (void)arg;
    cp_arrive(&tid_checker);
    for (unsigned long round = 1;; round++) {
        for (size_t i = 0; i < DATA_LEN; i++)
            cp_data[i] = (unsigned char)(i * 31 + round);
        for (size_t i = 0; i < DATA_LEN; i++)
            if (cp_data[i] != (unsigned char)(i * 31 + round)) {
                atomic_fetch_add(&check_fail, 1);
                break;
            }
        atomic_fetch_add(&checks, 1);
        cp_sleep_us(2000);
    }
    return NULL;
}

static void *cp_control_thread(void *arg)
{
    (void)arg;
    cp_control_loop();
    return NULL;
}

static void target_status(char *buf, size_t n)
{
    cp_appendf(buf, n, "spawned=%ld checks=%ld check_fail=%ld", atomic_load(&spawned),
               atomic_load(&checks), atomic_load(&check_fail));
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd; (void)reply; (void)n;
    return 0;
}

static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    int churners = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-z"))
            zombie_leader = 1;
        else if (!strcmp(argv[i], "-n") && i + 1 < argc)
            churners = atoi(argv[++i]);
    }
    cp_init();
    cp_spawn(cp_checker, NULL, "cp_checker", 0);
    for (int i = 0; i < churners; i++)
        cp_spawn(cp_churner, NULL, "cp_churner", 0);
    cp_wait_arrivals(CP_COMMON_THREADS + 1);
    while (atomic_load(&checks) < 2)
        cp_sleep_us(1000);
    cp_ready("data_addr=%p data_len=%d zombie_leader=%d", (void *)cp_data, DATA_LEN,
             zombie_leader);
    if (zombie_leader) {
        cp_spawn(cp_control_thread, NULL, "cp_control", 0);
        pthread_exit(NULL);
    }
    cp_control_loop();
    return 0;
}
