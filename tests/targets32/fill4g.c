/*
 * fill4g.c - an i386 process whose core cannot fit ELF32 file offsets.
 *
 * Build: gcc -m32 -O1 -pthread
 * Usage: fill4g threads N | fill4g vmas N
 *   Maps every free page of its 4 GiB address space with private anonymous
 *   memory it writes once (so a core dumps all of it; coredump_filter 0x3f
 *   adds the file-backed mappings), keeps the highest mapping's last page a
 *   VMA of its own (the last segment's size adds to no offset), then adds
 *   what only the core's header block or notes carry:
 *   threads N  N more threads with small stacks (a thread's notes take
 *              about 1-3 KiB): known only once the target is frozen;
 *   vmas N     N extra mappings (alternating protections split the memory
 *              into VMAs; each is a 32-byte program header): visible in
 *              /proc/PID/maps before anything is frozen.
 * Then writes "ready mapped=BYTES vmas=N threads=N\n" on stdout and ticks a
 * heartbeat counter, printing "beat N maxgap_us=GAP" (the longest pause of
 * the heartbeat thread) for each "\n" read on stdin.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long beats, maxgap_us;

static unsigned long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000UL + ts.tv_nsec / 1000;
}

static void *idle_thread(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

static void *heartbeat(void *arg)
{
    (void)arg;
    unsigned long prev = now_us();
    for (;;) {
        usleep(10000);
        unsigned long now = now_us();
        if (now - prev > maxgap_us)
            maxgap_us = now - prev;
        prev = now;
        beats++;
    }
    return NULL;
}

static void spawn(void *(*fn)(void *), size_t stack)
{
    pthread_attr_t a;
    pthread_t t;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, stack);
    pthread_attr_setguardsize(&a, 0);          /* a guard page is memory no core dumps */
    if (pthread_create(&t, &a, fn, NULL) != 0) {
        perror("pthread_create");
        exit(1);
    }
    pthread_attr_destroy(&a);
}

static char *top_end;           /* end of the highest mapping fill() made */

/* Map and touch every free range, largest pieces first. */
static unsigned long long fill(char **first, size_t *first_len)
{
    unsigned long long total = 0;
    for (size_t size = 1UL << 31; size >= 4096; size >>= 1) {
        for (;;) {
            char *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED)
                break;
            p[0] = 1;                               /* anon_vma: the core dumps it all */
            p[size - 1] = 1;
            total += size;
            if (p + size > top_end)
                top_end = p + size;
            if (size > *first_len) {
                *first = p;
                *first_len = size;
            }
        }
    }
    return total;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "threads") && strcmp(argv[1], "vmas"))) {
        fprintf(stderr, "usage: fill4g threads N | fill4g vmas N\n");
        return 2;
    }
    long n = atol(argv[2]);
    long threads = 0, vmas = 0;
    /* No allocation may be needed once the address space is full. */
    static char inbuf[256], outbuf[256];
    setvbuf(stdin, inbuf, _IOLBF, sizeof inbuf);
    setvbuf(stdout, outbuf, _IOLBF, sizeof outbuf);
    /* Dump file-backed memory too (libc's text): less address space lost to the core. */
    FILE *f = fopen("/proc/self/coredump_filter", "w");
    if (!f || fprintf(f, "0x3f\n") < 0 || fclose(f) != 0) {
        perror("coredump_filter");
        return 1;
    }
    spawn(heartbeat, 64 * 1024);
    if (!strcmp(argv[1], "threads"))
        for (; threads < n; threads++)
            spawn(idle_thread, 16 * 1024);
    char *big = NULL;
    size_t big_len = 0;
    unsigned long long mapped = fill(&big, &big_len);
    /* The last segment's own size never counts towards an offset: keep it one page. */
    if (top_end && mprotect(top_end - 4096, 4096, PROT_READ) != 0) {
        perror("mprotect top");
        return 1;
    }
    if (!strcmp(argv[1], "vmas")) {
        /* Every other page of the largest mapping read-only: 2 VMAs per pair. */
        for (long i = 0; 2 * i < n && (size_t)(2 * i + 2) * 4096 <= big_len; i++, vmas += 2) {
            char *page = big + (size_t)(2 * i + 1) * 4096;
            page[0] = 1;                            /* each piece holds a page */
            page[-4096] = 1;
            if (mprotect(page, 4096, PROT_READ) != 0) {
                perror("mprotect");
                break;
            }
        }
    }
    printf("ready mapped=%llu vmas=%ld threads=%ld\n", mapped, vmas, threads);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin))
        printf("beat %lu maxgap_us=%lu\n", beats, maxgap_us), fflush(stdout);
    return 0;
}
