/*
 * manymaps.c - a process with more mappings than an ELF header can count (PN_XNUM).
 *
 * Usage: manymaps N
 * Maps N pages in one anonymous region and makes every other page read-only,
 * which splits it into N mappings (needs vm.max_map_count above N plus the
 * usual few dozen). Page i holds the 8-byte word 0x4d4150000000 | i at its start.
 * Protocol: see cp_common.c. Ready line adds addr=0x.. pages=N page_size=N.
 */
#include "cp_common.c"
#include <sys/mman.h>

static void target_status(char *buf, size_t n) { (void)buf; (void)n; }
static int target_command(const char *cmd, char *reply, size_t n)
{
    (void)cmd; (void)reply; (void)n;
    return 0;
}
static void target_cleanup(void) {}

int main(int argc, char **argv)
{
    long pages = argc > 1 ? atol(argv[1]) : 70000;
    long page = sysconf(_SC_PAGESIZE);
    cp_init();
    unsigned char *base = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        cp_die("mmap: %s", strerror(errno));
    for (long i = 0; i < pages; i++)
        *(uint64_t *)(base + i * page) = 0x4d4150000000ULL | (uint64_t)i;
    for (long i = 1; i < pages; i += 2)
        if (mprotect(base + i * page, page, PROT_READ))
            cp_die("mprotect page %ld: %s (vm.max_map_count too low?)", i, strerror(errno));
    cp_wait_arrivals(CP_COMMON_THREADS);
    cp_ready("addr=%p pages=%ld page_size=%ld", (void *)base, pages, page);
    cp_control_loop();
    return 0;
}
