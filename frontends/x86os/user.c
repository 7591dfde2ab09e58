/* The user programs: two processes in ring 3, the same C in every build.
 *
 * Each makes system calls, touches fresh (demand-zero) heap pages, yields to the other
 * and computes something whose result it prints; the outputs must not depend on how the
 * kernel under it is virtualized.  No globals: the code and its constants are mapped
 * read-only into both processes; everything writable is on the stack or the heap. */
#include "os.h"

long sys_call(long nr, long a, long b, long c);

static void put(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    sys_call(SYS_write, (long)s, n, 0);
}

static char *fmt_u(char *p, u64 v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* "<tag>: <what>=<value>\n" in one write */
static void report(const char *tag, const char *what, u64 value)
{
    char line[96];
    char *p = line;
    while (*tag)
        *p++ = *tag++;
    *p++ = ':';
    *p++ = ' ';
    while (*what)
        *p++ = *what++;
    *p++ = '=';
    p = fmt_u(p, value);
    *p++ = '\n';
    *p = 0;
    put(line);
}

static u64 primes_below(u64 n)
{
    u64 count = 0;
    for (u64 i = 2; i < n; i++) {
        u64 d = 2;
        while (d * d <= i && i % d)
            d++;
        if (d * d > i)
            count++;
    }
    return count;
}

int user_main(int id)
{
    const char *tag = id == 1 ? "A" : "B";
    long ops = sys_call(SYS_phase, 0, 0, 0); /* phase 0 answers how many repetitions */
    report(tag, "pid", (u64)sys_call(SYS_getpid, 0, 0, 0));

    if (id == 1) {
        sys_call(SYS_phase, PHASE_SYSCALL, 1, 0);
        u64 sum = 0;
        for (long i = 0; i < ops; i++)
            sum += (u64)sys_call(SYS_getpid, 0, 0, 0);
        sys_call(SYS_phase, PHASE_SYSCALL, 0, 0);
        report(tag, "getpid-sum", sum);
    }

    /* Fresh heap pages: each must read as zero before we write it. */
    volatile u64 *heap = (volatile u64 *)USER_HEAP;
    u64 zero_ok = 0, total = 0;
    if (id == 1)
        sys_call(SYS_phase, PHASE_FAULT, 1, 0);
    for (long i = 0; i < ops; i++) {
        volatile u64 *page = heap + i * (PAGE_SIZE / 8) + (id == 1 ? 0 : 7);
        zero_ok += page[1] == 0 && page[100] == 0;
        page[0] = (u64)(i * 7 + id);
    }
    if (id == 1)
        sys_call(SYS_phase, PHASE_FAULT, 0, 0);
    for (long i = 0; i < ops; i++)
        total += heap[i * (PAGE_SIZE / 8) + (id == 1 ? 0 : 7)];
    report(tag, "fresh-pages-zero", zero_ok);
    report(tag, "heap-sum", total);

    /* Ping-pong: A yields once unmeasured (B runs up to its first yield), then ops times
     * inside the phase, each answered by one yield of B: 2 * ops switches. */
    if (id == 1) {
        sys_call(SYS_phase, PHASE_NULL, 1, 0); /* an empty phase: what a marker pair costs */
        sys_call(SYS_phase, PHASE_NULL, 0, 0);
        sys_call(SYS_yield, 0, 0, 0);
        sys_call(SYS_phase, PHASE_SWITCH, 1, 0);
        for (long i = 0; i < ops; i++)
            sys_call(SYS_yield, 0, 0, 0);
        sys_call(SYS_phase, PHASE_SWITCH, 0, 0);
    } else {
        for (long i = 0; i <= ops; i++)
            sys_call(SYS_yield, 0, 0, 0);
    }

    if (id == 1) {
        /* Compute long enough for timer ticks to land in user mode. */
        sys_call(SYS_phase, PHASE_TIMER, 1, 0);
        u64 n = 0;
        for (u64 k = 0; k < (u64)ops * 250000; k++)
            n += k ^ (n >> 3);
        sys_call(SYS_phase, PHASE_TIMER, 0, 0);
        report(tag, "busy-loop", n & 0xffff);
        report(tag, "primes-below-3000", primes_below(3000));
    } else {
        u64 h = 1469598103934665603UL;
        for (u64 i = 0; i < 5000; i++)
            h = (h ^ i) * 1099511628211UL;
        report(tag, "fnv", h);
    }
    report(tag, "exit", (u64)id);
    sys_call(SYS_exit, 0, 0, 0);
    return 0;
}
