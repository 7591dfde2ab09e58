/* The pieces of libc a freestanding kernel needs: memory and string helpers, a small
 * snprintf (%s %d %u %x %lx %lu %ld %c %p %%), printk through console_io, parsing of the
 * start_info command line ("key=value key=value ..."), MAC and IPv4 addresses. */
#include "pvio.h"
#include <stdarg.h>

void *memcpy(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    if (((u64)d | (u64)s | n) % 8 == 0) {
        u64 *dq = dst;
        const u64 *sq = src;
        for (size_t i = 0; i < n / 8; i++)
            dq[i] = sq[i];
        return dst;
    }
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

char *strcpy_bounded(char *dst, const char *src, size_t size)
{
    size_t i = 0;
    for (; i + 1 < size && src[i]; i++)
        dst[i] = src[i];
    if (size)
        dst[i] = 0;
    return dst;
}

struct out {
    char *buf;
    size_t size, len;
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_num(struct out *o, u64 v, unsigned base, int width, char pad, int neg)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (n < width--)
        put(o, pad);
    while (n)
        put(o, tmp[--n]);
}

static int vformat(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = {buf, size, 0};
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0')
            pad = '0', fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l')
            lng = 1, fmt++;
        switch (*fmt) {
        case 'd': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
            put_num(&o, v < 0 ? (u64)-v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u':
            put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, width, pad, 0);
            break;
        case 'x':
            put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, width, pad, 0);
            break;
        case 'p':
            put(&o, '0'), put(&o, 'x');
            put_num(&o, (u64)va_arg(ap, void *), 16, 0, ' ', 0);
            break;
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            for (s = s ? s : "(null)"; *s; s++)
                put(&o, *s);
            break;
        }
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '?');
            break;
        }
        if (!*fmt)
            break;
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vformat(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

void printk(const char *fmt, ...)
{
    static char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vformat(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 1)
        n = sizeof line - 1;
    hypercall3(HC_console_io, CONSOLEIO_write, n, line);
}

void shutdown(unsigned reason)
{
    static u32 arg;
    arg = reason;
    for (;;)
        hypercall3(HC_sched_op, SCHEDOP_shutdown, &arg, 0);
}

void panic(const char *msg)
{
    printk("PANIC: %s\n", msg);
    shutdown(SHUTDOWN_crash);
}

int parse_u64(const char *s, u64 *out)
{
    u64 v = 0;
    if (!*s)
        return -EINVAL;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 0xFFFFFFFFFFFFFFFUL)
            return -EINVAL;
        v = v * 10 + (u64)(*s - '0');
    }
    *out = v;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int parse_mac(const char *s, u8 mac[6])
{
    for (int i = 0; i < 6; i++) {
        int hi = hexval(s[0]), lo = hexval(s[1]);
        if (hi < 0 || lo < 0 || (i < 5 && s[2] != ':') || (i == 5 && s[2]))
            return -EINVAL;
        mac[i] = (u8)(hi * 16 + lo);
        s += 3;
    }
    return 0;
}

int parse_ip(const char *s, u8 ip[4])
{
    for (int i = 0; i < 4; i++) {
        unsigned v = 0, digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4)
            v = v * 10 + (unsigned)(*s++ - '0'), digits++;
        if (!digits || v > 255 || (i < 3 && *s != '.') || (i == 3 && *s))
            return -EINVAL;
        ip[i] = (u8)v;
        s++;
    }
    return 0;
}

extern struct start_info *start_info;

/* The value of "key=value" in the command line (words separated by spaces), or NULL. */
const char *cmdline_get(const char *key, char *out, size_t size)
{
    const char *p = start_info->cmd_line;
    const char *end = p + sizeof start_info->cmd_line;
    size_t klen = strlen(key);
    while (p < end && *p) {
        while (p < end && *p == ' ')
            p++;
        const char *word = p;
        while (p < end && *p && *p != ' ')
            p++;
        if ((size_t)(p - word) > klen && !strncmp(word, key, klen) && word[klen] == '=') {
            size_t n = (size_t)(p - word) - klen - 1;
            if (n >= size)
                n = size - 1;
            memcpy(out, word + klen + 1, n);
            out[n] = 0;
            return out;
        }
    }
    return NULL;
}
