/* pvio x86 guest kernel: its internal interfaces.  The ABI it speaks (Xen's numbers and
 * layouts, pvio's start_info extension, the devices' registers and descriptors, the bench
 * mailbox) is not written here: it comes from pvio_abi.h, which the build generates from
 * the hypervisor's own definitions (pvio.abi), and the rings from ringbuf/ring.h, the ring
 * every pvio component uses (docs/abi.md, docs/architecture.md). */
#ifndef PVIO_H
#define PVIO_H

#include "pvio_abi.h"
#include "ring.h"

#define NULL ((void *)0)
#define PAGE_SIZE (1UL << PAGE_SHIFT)

/* ------------------------------------------------------------------ barriers, atomics */
#define barrier() __asm__ __volatile__("" ::: "memory")
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)      /* xen_mb: full fence */
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)     /* index before entries */
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)     /* entries before index */
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ------------------------------------------------------------------ hypercalls */
extern u64 hypercall_base; /* guest address of the hypercall page */
extern u64 hypercall_iret; /* hypercall_base + 23 * 32, jumped to by the upcall stub */

/* Xen's 64-bit convention: number in RAX (set by the stub), args RDI RSI RDX R10 R8,
 * result in RAX; the stubs preserve RCX and R11 around the syscall. */
static inline long hypercall5(unsigned nr, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    long ret;
    register u64 r10 __asm__("r10") = a4;
    register u64 r8 __asm__("r8") = a5;
    u64 fn = hypercall_base + (u64)nr * 32;
    __asm__ __volatile__("call *%[fn]"
                         : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)
                         : [fn] "r"(fn)
                         : "memory", "rcx", "r11", "cc");
    return ret;
}
#define hypercall3(nr, a, b, c) hypercall5((nr), (u64)(a), (u64)(b), (u64)(c), 0, 0)

/* ------------------------------------------------------------------ lib.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strcpy_bounded(char *dst, const char *src, size_t size);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void printk(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int parse_u64(const char *s, u64 *out);
int parse_mac(const char *s, u8 mac[6]);
int parse_ip(const char *s, u8 ip[4]);
const char *cmdline_get(const char *key, char *out, size_t size);
void panic(const char *msg) __attribute__((noreturn));
void shutdown(unsigned reason) __attribute__((noreturn));

/* ------------------------------------------------------------------ events.c */
typedef void (*evtchn_handler_t)(u32 port);
#define NR_EVTCHN_PORTS 1024 /* ports this kernel handles (of EVTCHN_2L_NR_CHANNELS) */
extern struct shared_info *shared;
extern volatile u64 events_seen;
void events_init(void);
void bind_evtchn(u32 port, evtchn_handler_t handler);
int evtchn_alloc_unbound(u16 remote, u32 *port);
int evtchn_bind_virq(u32 virq, u32 *port);
int evtchn_send(u32 port);
int evtchn_close(u32 port);
void local_irq_enable(void);
void wait_for_events(void);
u64 now_ns(void);              /* system time (vcpu_time_info), ns */
void set_timer(u64 deadline);  /* set_timer_op: VIRQ_TIMER at system time deadline (0 cancels) */

/* ------------------------------------------------------------------ mm.c, gnttab.c */
void mm_init(u64 first_gfn, u64 end_gfn);
u64 alloc_page(void); /* returns a guest-physical address, zeroed; panics when out */
u64 pages_free(void);
void gnttab_init(u64 table_gfn, u32 frames);
u32 gnttab_grant_access(u16 domid, u64 gfn, int readonly);
int gnttab_end_access(u32 ref);

/* ------------------------------------------------------------------ xenbus.c */
void xenbus_init(u64 ring_gpa, u32 port);
int xenbus_read(u32 tx, const char *path, char *out, size_t size);
int xenbus_write(u32 tx, const char *path, const char *value);
int xenbus_transaction_start(u32 *tx);
int xenbus_transaction_end(u32 tx, int abort);
int xenbus_watch(const char *path, const char *token);
int xenbus_unwatch(const char *path, const char *token);
int xenbus_wait_watch(const char *token);
int xenbus_watch_fired(const char *token); /* non-blocking: 1 if an event of token was taken */
int xenbus_read_int(const char *path, u64 *out);
int xenbus_wait_state(const char *path, unsigned accept_mask);

/* ------------------------------------------------------------------ netfront.c */
struct netfront_stats {
    u64 tx_packets, rx_packets, notifies, suppressed, tx_errors, rx_errors, drops;
};
extern struct netfront_stats nf_stats;
typedef void (*netfront_rx_t)(const u8 *frame, u32 len);
int netfront_init(unsigned domid, netfront_rx_t rx, const char *mode);
const u8 *netfront_mac(void);
int netfront_connected(void);
const char *netfront_error(void);
u32 netfront_tx_free(void);
u8 *netfront_tx_slot_buffer(void); /* the pool page of the next free TX slot (pktgen) */
int netfront_xmit(const u8 *frame, u32 len); /* stage; 0 ok, -ENOSPC when the ring is full */
int netfront_xmit_staged(u32 len);           /* stage a frame written into netfront_tx_slot_buffer() */
void netfront_push(void);                    /* publish staged requests (notify if asked) */
int netfront_poll(void);                     /* reap TX, receive RX; returns work done */
int netfront_final_check(void);              /* arm event indices; nonzero if work appeared */
u32 netfront_tx_outstanding(void);
void netfront_hostile_push(u32 extra);       /* test mode: publish an impossible req_prod */
void netfront_hostile_bad_tx_gref(void);     /* test mode: a TX request naming a bad grant */
void netfront_close(void);                   /* Closing, revoke every grant, Closed */

/* ------------------------------------------------------------------ the NIC in use (nic.c)
 * One interface over the three device models (cmd_line nic=pv|emulated|smartnic): the
 * network stack, the echo loop, pktgen and the bench app only use these. */
struct nic_ops {
    const char *name;
    int (*init)(unsigned domid, netfront_rx_t rx, const char *mode);
    const u8 *(*mac)(void);
    int (*connected)(void);
    const char *(*error)(void);
    int (*xmit)(const u8 *frame, u32 len); /* stage a frame; -ENOSPC when no TX room */
    void (*push)(void);                    /* publish staged frames (notify the device if needed) */
    int (*poll)(void);                     /* reap TX, receive RX (calls rx); returns work done */
    void (*wait)(void);                    /* idle: poll while busy, then arm the interrupt and sleep */
    u32 (*tx_outstanding)(void);
};
extern const struct nic_ops *nic;
extern const struct nic_ops netfront_ops, emunic_ops, snic_ops;
int nic_select(const char *name); /* 0, or -EINVAL for an unknown model */

/* emunic.c / snic.c: driver statistics (the bench app's mailbox gives their address; the
 * harness, cpu/bench_guest.py, and the tests read them from guest memory).  rx_errors:
 * frames refused for a bad length or status (and RXOVW reports); bad_completions: smart
 * NIC completions whose id is outside the ring's buffers or not outstanding. */
extern struct nicdrv_stats drv_stats;
void emunic_hostile_bad_registers(void); /* test mode badreg: a bad TXLEN, a bad register */
void snic_hostile_bad_descriptor(void);  /* test mode baddesc: a TX descriptor naming no buffer */

/* ------------------------------------------------------------------ bench.c */
void bench_init(void);               /* mode=bench: the mailbox and the harness VIRQ */
void bench_rx(const u8 *frame, u32 len); /* the rx handler in mode=bench */
void bench_loop(void) __attribute__((noreturn));

/* ------------------------------------------------------------------ netstack.c */
void netstack_init(const u8 mac[6], const u8 ip[4]);
void netstack_input(const u8 *frame, u32 len);
u16 inet_checksum(const void *data, u32 len, u32 initial);
extern struct netstack_stats {
    u64 arp_replies, icmp_replies, udp_replies, ignored, malformed, reply_drops;
} ns_stats;

#endif
