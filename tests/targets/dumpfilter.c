/*
 * dumpfilter.c - memory a core must leave out, next to memory it must keep.
 *
 * Usage: dumpfilter
 * Three 64 KiB anonymous mappings, each filled with its own byte pattern:
 *   dontdump  private, madvise(MADV_DONTDUMP): never in a core;
 *   shared    MAP_SHARED: in a core only while coredump_filter bit 1 is set
 *             (the test clears it through /proc/PID/coredump_filter);
 *   kept      private: always in a core.
 * Protocol: see cp_common.c. Ready line adds dontdump_addr= shared_addr= kept_addr=
 * size=N. Bytes come from an LCG (x = x * 1103515245 + 12345 mod 2^32, byte = x >> 16)
 * started at SEED 0xA1, 0xB2, 0xC3: no region's bytes occur in another's.
 */
#include "cp_common.c"
#include <sys/mman.h>

#define REGION (64 * 1024)

static void *map_filled(int flags, int seed)
{
    unsigned char *p = mmap(NULL, REGION, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        cp_die("mmap: %s", strerror(errno));
    uint32_t x = (uint32_t)seed;
    for (int i = 0; i < REGION; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (unsigned char)(x >> 16);
    }
    return p;
}

static void target_status(char *buf, size_t n) { (void)buf; (void)n; }
static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd; (void)reply; (void)n;
    return 0;
}
static void target_cleanup(void) {}

int main(void)
{
    cp_init();
    void *dontdump = map_filled(MAP_PRIVATE, 0xA1);
    void *shared = map_filled(MAP_SHARED, 0xB2);
    void *kept = map_filled(MAP_PRIVATE, 0xC3);
    if (madvise(dontdump, REGION, MADV_DONTDUMP))
        cp_die("madvise: %s", strerror(errno));
    cp_wait_arrivals(CP_COMMON_THREADS);
    cp_ready("dontdump_addr=%p shared_addr=%p kept_addr=%p size=%d", dontdump, shared, kept,
             REGION);
    cp_control_loop();
    return 0;
}
