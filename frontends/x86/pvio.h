/* pvio x86 guest kernel: the ABI it speaks (Xen's layouts, pvio's start_info extension)
 * and the kernel's internal interfaces.  Every layout here is Xen's public one (or pvio's,
 * docs/abi.md), written from the fact sheet: struct sizes and offsets are checked at
 * compile time (_Static_assert), and tests/test_x86_vcpu.py checks every number defined
 * here against pvio.abi, the hypervisor's single definition. */
#ifndef PVIO_H
#define PVIO_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef signed short s16;
typedef signed int s32;
typedef signed long s64;
typedef unsigned long size_t;
#define NULL ((void *)0)
#define PAGE_SHIFT 12
#define PAGE_SIZE 4096UL

/* ------------------------------------------------------------------ barriers, atomics */
#define barrier() __asm__ __volatile__("" ::: "memory")
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)      /* xen_mb: full fence */
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)     /* index before entries */
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)     /* entries before index */
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ------------------------------------------------------------------ hypercalls (xen.h) */
#define HC_set_callbacks 4
#define HC_set_timer_op 15
#define HC_xen_version 17
#define HC_console_io 18
#define HC_grant_table_op 20
#define HC_iret 23
#define HC_sched_op 29
#define HC_event_channel_op 32
#define CONSOLEIO_write 0
#define SCHEDOP_yield 0
#define SCHEDOP_block 1
#define SCHEDOP_shutdown 2
#define SHUTDOWN_poweroff 0
#define SHUTDOWN_crash 3
#define VIRQ_TIMER 0 /* set_timer_op's one-shot timer fires it */
#define EVTCHNOP_bind_virq 1
#define EVTCHNOP_close 3
#define EVTCHNOP_send 4
#define EVTCHNOP_alloc_unbound 6
#define EVTCHNOP_unmask 9
#define DOMID_SELF 0x7FF0
#define EAGAIN 11
#define ENOENT 2
#define EINVAL 22
#define EIO 5
#define ENOSPC 28

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

/* ------------------------------------------------------------------ shared_info (x86_64) */
/* Xen's vcpu_time_info: time = system_time + scaled TSC delta.  pvio's vCPU publishes
 * system_time (trio's clock, ns) at the start of every slice with tsc_to_system_mul = 0:
 * no TSC extrapolation, the time of the slice's start (docs/abi.md). */
struct vcpu_time_info {
    u32 version; /* odd while the hypervisor updates */
    u32 pad0;
    u64 tsc_timestamp;
    u64 system_time;
    u32 tsc_to_system_mul;
    s8 tsc_shift;
    u8 flags;
    u8 pad1[2];
};
_Static_assert(sizeof(struct vcpu_time_info) == 32, "vcpu_time_info is 32 bytes");
struct vcpu_info {
    u8 evtchn_upcall_pending; /* Xen sets; the guest clears at the start of its scan */
    u8 evtchn_upcall_mask;    /* guest: 1 = no upcalls (our "cli") */
    u8 pad[6];
    u64 evtchn_pending_sel; /* Xen sets bits; the guest exchanges it with 0 */
    u8 arch[16];            /* arch_vcpu_info: cr2, pad */
    struct vcpu_time_info time;
};
#define VCPU_TIME_INFO 32
_Static_assert(__builtin_offsetof(struct vcpu_info, time) == VCPU_TIME_INFO, "time at 32");
struct shared_info {
    struct vcpu_info vcpu_info[32];
    u64 evtchn_pending[64]; /* Xen sets, guest clears */
    u64 evtchn_mask[64];    /* guest-owned */
};
_Static_assert(sizeof(struct vcpu_info) == 64, "vcpu_info is 64 bytes");
_Static_assert(__builtin_offsetof(struct shared_info, evtchn_pending) == 2048, "pending at 2048");
_Static_assert(__builtin_offsetof(struct shared_info, evtchn_mask) == 2560, "mask at 2560");

/* ------------------------------------------------------------------ start_info + pvio ext */
struct start_info {
    char magic[32];
    u64 nr_pages;
    u64 shared_info; /* guest-physical address */
    u32 flags;
    u32 pad0;
    u64 store_mfn;
    u32 store_evtchn;
    u32 pad1;
    u64 console_mfn;
    u32 console_evtchn;
    u8 pad2[128 - 84];
    char cmd_line[1024];
};
_Static_assert(__builtin_offsetof(struct start_info, store_mfn) == 56, "store_mfn at 56");
_Static_assert(__builtin_offsetof(struct start_info, store_evtchn) == 64, "store_evtchn at 64");
_Static_assert(__builtin_offsetof(struct start_info, cmd_line) == 128, "cmd_line at 128");
struct pvio_start_ext { /* at offset 2048 of the start_info page */
    char magic[4];      /* "PVIO" */
    u16 domid;
    u16 gnttab_frames;
    u64 gnttab_gfn;
    u64 hypercall_gfn;
    u64 first_free_gfn;
    u64 free_end_gfn;
} __attribute__((packed));
#define PVIO_EXT_OFFSET 2048

/* ------------------------------------------------------------------ grant table v1 */
struct grant_entry_v1 {
    u16 flags;
    u16 domid;
    u32 frame;
};
#define GTF_permit_access 1
#define GTF_readonly (1 << 2)
#define GTF_reading (1 << 3)
#define GTF_writing (1 << 4)
#define GNTTAB_NR_RESERVED 8

/* ------------------------------------------------------------------ rings (io/ring.h) */
struct sring_header {
    u32 req_prod; /* front writes */
    u32 req_event; /* back writes: notify me when req_prod passes this */
    u32 rsp_prod; /* back writes */
    u32 rsp_event; /* front writes */
    u8 pvt[4];
    u8 pad[44];
};
_Static_assert(sizeof(struct sring_header) == 64, "ring header is 64 bytes");
struct netif_tx_request { u32 gref; u16 offset; u16 flags; u16 id; u16 size; };
struct netif_tx_response { u16 id; s16 status; };
struct netif_rx_request { u16 id; u16 pad; u32 gref; };
struct netif_rx_response { u16 id; u16 offset; u16 flags; s16 status; };
_Static_assert(sizeof(struct netif_tx_request) == 12, "tx request 12 B");
_Static_assert(sizeof(struct netif_rx_response) == 8, "rx response 8 B");
#define NET_TX_RING_SIZE 256 /* (4096 - 64) / 12 = 336 -> 256 */
#define NET_RX_RING_SIZE 256 /* (4096 - 64) / 8 = 504 -> 256 */
#define NETTXF_more_data 0x4
#define NETRXF_more_data 0x4
#define NETIF_RSP_OKAY 0
#define NETIF_RSP_NULL 1
#define NR_SLOTS_MAX 18

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
#define NR_EVTCHN_PORTS 1024
extern struct shared_info *shared;
extern volatile u64 events_seen;
void events_init(void);
void bind_evtchn(u32 port, evtchn_handler_t handler);
int evtchn_alloc_unbound(u16 remote, u32 *port);
int evtchn_bind_virq(u32 virq, u32 *port);
int evtchn_send(u32 port);
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
#define XS_READ 2
#define XS_WATCH 4
#define XS_UNWATCH 5
#define XS_TRANSACTION_START 6
#define XS_TRANSACTION_END 7
#define XS_WRITE 11
#define XS_WATCH_EVENT 15
#define XS_ERROR 16
#define XenbusStateInitialising 1
#define XenbusStateInitWait 2
#define XenbusStateConnected 4
#define XenbusStateClosing 5
#define XenbusStateClosed 6
void xenbus_init(u64 ring_gpa, u32 port);
int xenbus_read(u32 tx, const char *path, char *out, size_t size);
int xenbus_write(u32 tx, const char *path, const char *value);
int xenbus_transaction_start(u32 *tx);
int xenbus_transaction_end(u32 tx, int abort);
int xenbus_watch(const char *path, const char *token);
int xenbus_unwatch(const char *path, const char *token);
int xenbus_wait_watch(const char *token);
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
struct nicdrv_stats {
    u64 tx_packets, rx_packets, irqs, spurious, tx_errors, rx_errors, bad_completions, doorbells, rearms;
};
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
