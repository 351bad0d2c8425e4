/*
 * tls_desc.c - a libc-free i386 target that controls its GDT TLS descriptors.
 *
 * Build: gcc -m32 -static -nostdlib -fno-pic -fno-stack-protector -O1
 * Usage: tls_desc none|zero-base
 *   none       never calls set_thread_area: every TLS descriptor stays empty,
 *              so the kernel's core has no NT_386_TLS note;
 *   zero-base  installs a descriptor with base 0 and limit 0 but present,
 *              writable, 32-bit: not empty, so the note is there although
 *              base and limit read zero.
 * Then writes "ready entry=N\n" on fd 1 and one '.' every 20 ms forever
 * (the heartbeat that shows it keeps running after a capture).
 */

struct user_desc {
    unsigned int entry_number;
    unsigned int base_addr;
    unsigned int limit;
    unsigned int seg_32bit : 1;
    unsigned int contents : 2;
    unsigned int read_exec_only : 1;
    unsigned int limit_in_pages : 1;
    unsigned int seg_not_present : 1;
    unsigned int useable : 1;
};

#define NR_exit 1
#define NR_write 4
#define NR_nanosleep 162
#define NR_set_thread_area 243

static long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static void put(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    sys3(NR_write, 1, (long)s, n);
}

void cmain(long *sp)
{
    char **argv = (char **)(sp + 1);
    int entry = -1;
    if (sp[0] < 2 || !(streq(argv[1], "none") || streq(argv[1], "zero-base"))) {
        put("usage: tls_desc none|zero-base\n");
        sys3(NR_exit, 2, 0, 0);
    }
    if (streq(argv[1], "zero-base")) {
        struct user_desc d = { .entry_number = (unsigned)-1, .seg_32bit = 1, .useable = 1 };
        if (sys3(NR_set_thread_area, (long)&d, 0, 0) != 0)
            sys3(NR_exit, 3, 0, 0);
        entry = (int)d.entry_number;
    }
    char line[32] = "ready entry=";
    char *p = line + 12;
    if (entry < 0) {
        *p++ = '-';
        *p++ = '1';
    } else {
        if (entry >= 10)
            *p++ = (char)('0' + entry / 10);
        *p++ = (char)('0' + entry % 10);
    }
    *p++ = '\n';
    *p = 0;
    put(line);
    struct { long sec, nsec; } ts = { 0, 20 * 1000 * 1000 };
    for (;;) {
        sys3(NR_nanosleep, (long)&ts, 0, 0);
        sys3(NR_write, 1, (long)".", 1);
    }
}

__asm__(".globl _start\n"
        "_start:\n"
        "  xorl %ebp, %ebp\n"
        "  movl %esp, %eax\n"
        "  andl $-16, %esp\n"
        "  subl $12, %esp\n"
        "  pushl %eax\n"
        "  call cmain\n"
        "  hlt\n");
