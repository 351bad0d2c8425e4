/*
 * growmem.c - memory that grows and CPU that spins, on command, for triggers.
 *
 * Commands (protocol: see cp_common.c):
 *   grow MIB  touch MIB more MiB of fresh anonymous memory (words hold
 *             0xC0DE... | their index); replies "grown rss_mib=N"
 *   spin      start a thread that burns one CPU; replies "spinning"
 *   calm      stop it; replies "calm"
 */
#include "cp_common.c"
#include <sys/mman.h>

static atomic_int spinning;
static size_t grown_mib;

static void *cp_spin(void *arg)
{
    (void)arg;
    volatile unsigned long x = 0;
    while (atomic_load(&spinning))
        x++;
    return NULL;
}

static int target_command(const char *cmd, char *reply, size_t n)
{
    unsigned long mib;
    if (sscanf(cmd, "grow %lu", &mib) == 1) {
        size_t len = mib << 20;
        uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            cp_die("mmap");
        for (size_t i = 0; i < len / 8; i++)
            p[i] = 0xC0DE000000000000ULL | i;
        grown_mib += mib;
        snprintf(reply, n, "grown grown_mib=%zu addr=0x%lx", grown_mib, (unsigned long)p);
        return 1;
    }
    if (!strcmp(cmd, "spin")) {
        pthread_t t;
        atomic_store(&spinning, 1);
        if (pthread_create(&t, NULL, cp_spin, NULL))
            cp_die("pthread_create");
        pthread_detach(t);
        snprintf(reply, n, "spinning");
        return 1;
    }
    if (!strcmp(cmd, "calm")) {
        atomic_store(&spinning, 0);
        snprintf(reply, n, "calm");
        return 1;
    }
    return 0;
}

static void target_status(char *buf, size_t n)
{
    snprintf(buf, n, "grown_mib=%zu", grown_mib);
}

static void target_cleanup(void) {}

int main(void)
{
    cp_heartbeat_us = 10000;       /* idle: well under 1% of a CPU */
    cp_init();
    cp_ready("pid=%d", (int)getpid());
    cp_control_loop();
    return 0;
}
