/* The smart NIC driver (docs/devices.md, "Smart NIC"): descriptor rings in guest memory,
 * buffers from a pre-registered pool, the monitor does the DMA.
 *
 *   init: check ID; read MAC, IRQ, GRANT_DOMID; two rings of 2**RING_ORDER contiguous pages
 *         (pvio_front_init); a pool of NR_TX + NR_RX buffers of BUF_SIZE bytes in contiguous
 *         frames (indices < NR_TX for TX), twice as many RX buffers as TX buffers, so that a
 *         receiver still holding one burst has buffers posted for the next (a frame that finds
 *         none waits in the monitor and costs a second copy); post every RX buffer; program
 *         the rings, their order and the pool (and moderation if the
 *         cmd_line asks: mod=adaptive|fixed|off, mod_frames=, mod_usecs=); bind the VIRQ;
 *         CTRL=ENABLE; STATUS must say ENABLED.
 *   TX:   copy into a free TX buffer, write a descriptor, push; DOORBELL=TX only when the
 *         push crosses req_event, i.e. only when the device went idle.
 *   RX:   reap completions, copy each frame out once, re-post the buffer (DOORBELL=RX only
 *         if that push asks for it).
 *   idle: NAPI-style, poll while busy (check the completion indices for `spin=` rounds,
 *         default SPIN, each ended by hlt so the monitor's task runs in between), then re-arm
 *         with the final check: the RX ring's rsp_event at the next completion, the TX
 *         ring's at half the outstanding when every TX buffer is in flight; re-check; sleep.
 *         The budget is in rounds, never in time: how long a round takes depends on the
 *         host (the emulator), and a time budget made a slow host re-arm sooner and take
 *         more interrupts for the same traffic.  Counts are the same on any host and under
 *         MockClock (which stands still while the guest runs).
 *   busy poll: a push after the driver re-armed (it slept, so this send is likely a request
 *         after a pause, and the answer comes next) disarms the RX interrupt (rsp_event half
 *         the index space ahead) so the next wait's `spin=` rounds poll for the answer
 *         instead of taking an interrupt for it; the wait re-arms when its rounds run out.
 *         Linux's busy polling (SO_BUSY_POLL, prefer_busy_poll) in rounds, not µs.
 *
 * Rings: the descriptor rings are Xen rings of 16-byte descriptors (requests) and 8-byte
 * completions (responses), so both are struct pvio_front_ring driven only through ring.c:
 * descriptors go in with pvio_front_put_requests and out with pvio_front_push_requests,
 * completions come back with pvio_front_take_responses, the idle path arms with
 * pvio_front_final_check_for_responses.  This file keeps the pool's bookkeeping (free TX
 * buffers, buffers in flight) and whether TX descriptors wait to be published.
 *
 * Hardened (completions are device-written, never trusted): a completion index further
 * ahead than the descriptors posted (PVIO_RING_EOVERFLOW) stops the driver; a completion id
 * outside its ring's buffers or not outstanding, a length beyond the buffer or a bad status
 * is refused and counted; take_responses copies every entry once from the ring, and only
 * the copy is used. */
#include "pvio.h"

#define RING_ORDER 1                                  /* two pages per ring */
#define RING_ENTRIES (SNIC_RING_ENTRIES << RING_ORDER) /* 256 slots: the RX ring holds NR_RX */
#define NR_TX SNIC_RING_ENTRIES
#define NR_RX (2 * NR_TX)
#define NR_BUFS (NR_TX + NR_RX)
#define BUF_SIZE 2048
#define SPIN 256 /* poll rounds; each one yields to the monitor (hlt ends the vCPU's slice) */
#define DISARMED 0x80000000u /* an event index half the ring's index space ahead: never crossed */

static volatile u32 *const regs = (volatile u32 *)SNIC_MMIO_BASE;
static struct pvio_front_ring tx_ring, rx_ring;
static u32 tx_unpushed; /* TX descriptors put on the ring since the last push */
static u64 pool;
static u16 tx_free[NR_TX];
static u32 tx_nfree;
static u8 tx_out[NR_TX], rx_posted[NR_BUFS];
static u16 repost[NR_RX];
/* Completions copied out of each ring (two: the RX handler may transmit, which may reap). */
static struct snic_cmpl tx_cmpl[RING_ENTRIES], rx_cmpl[RING_ENTRIES];
static u8 frame[BUF_SIZE];
static u8 mac[6];
static u32 port, grant_domid;
static u64 spin = SPIN;
static int rx_armed; /* the RX interrupt is armed (the last wait slept), not disarmed by a push */
static volatile int irq_pending;
static int connected;
static const char *error;
static netfront_rx_t rx_handler;

static u32 rd(u32 reg) { return regs[reg / 4]; }
static void wr(u32 reg, u32 v) { regs[reg / 4] = v; }
static void wr64(u32 reg, u64 v) { wr(reg, (u32)v), wr(reg + 4, (u32)(v >> 32)); }

static const u8 *snic_mac(void) { return mac; }
static int snic_connected(void) { return connected; }
static const char *snic_error(void) { return error; }
static u32 snic_tx_outstanding(void) { return NR_TX - tx_nfree; }

static void fail(const char *reason)
{
    if (error)
        return;
    error = reason;
    connected = 0;
    printk("snic: stopped: %s\n", reason);
}

static void on_irq(u32 p)
{
    (void)p;
    irq_pending = 1; /* wakes the poll; no register access */
}

/* Put one descriptor for pool buffer `buf` on ring r (there is room: every slot's buffer
 * is accounted for by tx_free / rx_posted). */
static void put_desc(struct pvio_front_ring *r, u32 buf, u16 len, u16 id)
{
    struct snic_desc d = {.buf = buf, .offset = 0, .len = len, .id = id, .flags = 0, .reserved = 0};
    pvio_front_put_requests(r, (const char *)&d, 1);
}

static void post_rx(u16 idx)
{
    put_desc(&rx_ring, idx, BUF_SIZE, idx);
    rx_posted[idx] = 1;
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, the notification being a doorbell (one MMIO exit). */
static void push_ring(struct pvio_front_ring *r, u32 bell)
{
    if (pvio_front_push_requests(r)) {
        drv_stats.doorbells++;
        wr(SNIC_REG_DOORBELL, bell);
    }
}

/* npages consecutive frames from the page allocator, the first at *base; -1 if they are not
 * consecutive (the device takes a ring and the pool as one guest-physical range each). */
static int alloc_contiguous(u64 npages, u64 *base)
{
    *base = alloc_page();
    for (u64 i = 1; i < npages; i++)
        if (alloc_page() != *base + i * PAGE_SIZE)
            return -1;
    return 0;
}

static void init_ring(struct pvio_front_ring *r)
{
    u64 base;
    if (alloc_contiguous(1u << RING_ORDER, &base))
        panic("snic: no contiguous pages for a ring");
    if (pvio_front_init(r, (void *)base, PAGE_SIZE << RING_ORDER, sizeof(struct snic_desc),
                        sizeof(struct snic_desc), sizeof(struct snic_cmpl)) || r->nr_ents != RING_ENTRIES)
        panic("snic: cannot initialise a ring");
}

static int snic_init(unsigned domid, netfront_rx_t rx, const char *mode)
{
    char buf[32];
    u64 v;
    (void)mode;
    rx_handler = rx;
    if (cmdline_get("spin", buf, sizeof buf) && !parse_u64(buf, &v))
        spin = v;
    if (rd(SNIC_REG_ID) != SNIC_ID) {
        error = "no smart NIC at its window";
        return -ENOENT;
    }
    u32 lo = rd(SNIC_REG_MAC_LO), hi = rd(SNIC_REG_MAC_HI);
    for (int i = 0; i < 4; i++)
        mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi, mac[5] = (u8)(hi >> 8);
    grant_domid = rd(SNIC_REG_GRANT_DOMID); /* buffers come from the pool: no grants needed */
    init_ring(&tx_ring);
    init_ring(&rx_ring);
    if (alloc_contiguous((u64)NR_BUFS * BUF_SIZE / PAGE_SIZE, &pool)) {
        error = "no contiguous pages for the buffer pool";
        return -ENOSPC;
    }
    for (u32 i = 0; i < NR_TX; i++)
        tx_free[tx_nfree++] = (u16)(NR_TX - 1 - i);
    for (u32 i = NR_TX; i < NR_BUFS; i++)
        post_rx((u16)i);
    pvio_front_push_requests(&rx_ring); /* posted before ENABLE: found when it attaches */
    wr64(SNIC_REG_TX_RING_LO, (u64)tx_ring.sring);
    wr64(SNIC_REG_RX_RING_LO, (u64)rx_ring.sring);
    wr64(SNIC_REG_POOL_LO, pool);
    wr(SNIC_REG_POOL_BUF_SIZE, BUF_SIZE);
    wr(SNIC_REG_POOL_COUNT, NR_BUFS);
    wr(SNIC_REG_RING_ORDER, RING_ORDER);
    if (cmdline_get("mod", buf, sizeof buf)) {
        u64 frames = 1, usecs = 0;
        u32 m = !strcmp(buf, "fixed") ? 1 : !strcmp(buf, "off") ? 2 : 0;
        wr(SNIC_REG_MOD_MODE, m);
        if (cmdline_get("mod_frames", buf, sizeof buf))
            parse_u64(buf, &frames);
        if (cmdline_get("mod_usecs", buf, sizeof buf))
            parse_u64(buf, &usecs);
        if (m == 1)
            wr(SNIC_REG_MOD_FRAMES, (u32)frames), wr(SNIC_REG_MOD_USECS, (u32)usecs);
    }
    u32 virq = rd(SNIC_REG_IRQ);
    if (evtchn_bind_virq(virq, &port)) {
        error = "cannot bind the NIC's VIRQ";
        return -EINVAL;
    }
    bind_evtchn(port, on_irq);
    wr(SNIC_REG_CTRL, SNIC_CTRL_ENABLE);
    if (!(rd(SNIC_REG_STATUS) & SNIC_ST_ENABLED)) {
        error = "the smart NIC refused its configuration";
        return -EIO;
    }
    connected = 1;
    printk("snic: dom%u card up, mac %02x:%02x:%02x:%02x:%02x:%02x, virq %u, pool %lx %ux%u\n", domid,
           mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], virq, pool, NR_BUFS, BUF_SIZE);
    return 0;
}

static int reap_tx(void)
{
    int taken = pvio_front_take_responses(&tx_ring, (char *)tx_cmpl, RING_ENTRIES);
    if (taken < 0) {
        fail("impossible TX completion index");
        return 0;
    }
    int n = 0;
    for (int i = 0; i < taken; i++) {
        u16 id = tx_cmpl[i].id;
        if (id >= NR_TX || !tx_out[id]) {
            drv_stats.bad_completions++;
            continue;
        }
        tx_out[id] = 0;
        tx_free[tx_nfree++] = id;
        if (tx_cmpl[i].status)
            drv_stats.tx_errors++;
        n++;
    }
    return n;
}

static int receive(void)
{
    int taken = pvio_front_take_responses(&rx_ring, (char *)rx_cmpl, RING_ENTRIES);
    if (taken < 0) {
        fail("impossible RX completion index");
        return 0;
    }
    u32 nrepost = 0;
    for (int i = 0; i < taken; i++) {
        u16 id = rx_cmpl[i].id, len = rx_cmpl[i].len;
        if (id < NR_TX || id >= NR_BUFS || !rx_posted[id]) {
            drv_stats.bad_completions++;
            continue;
        }
        rx_posted[id] = 0;
        repost[nrepost++] = id;
        if (rx_cmpl[i].status || len < 14 || len > BUF_SIZE) {
            drv_stats.rx_errors++;
            continue;
        }
        memcpy(frame, (u8 *)(pool + (u64)id * BUF_SIZE), len); /* out once, then re-post */
        drv_stats.rx_packets++;
        rx_handler(frame, len);
    }
    for (u32 i = 0; i < nrepost; i++) /* after the batch: a repeated id stays refused */
        post_rx(repost[i]);
    if (nrepost)
        push_ring(&rx_ring, SNIC_DB_RX);
    return (int)nrepost;
}

static int snic_xmit(const u8 *f, u32 len)
{
    if (!connected)
        return -EIO;
    if (len < 14 || len > BUF_SIZE)
        return -EINVAL;
    if (!tx_nfree)
        reap_tx();
    if (!tx_nfree)
        return -ENOSPC;
    u16 idx = tx_free[--tx_nfree];
    memcpy((u8 *)(pool + (u64)idx * BUF_SIZE), f, len);
    put_desc(&tx_ring, idx, (u16)len, idx);
    tx_unpushed++;
    tx_out[idx] = 1;
    drv_stats.tx_packets++;
    return 0;
}

static void snic_push(void)
{
    if (connected && tx_unpushed) {
        tx_unpushed = 0;
        push_ring(&tx_ring, SNIC_DB_TX);
        if (rx_armed) { /* busy poll for the answer: the next wait's rounds look for it */
            rx_armed = 0;
            pvio_front_final_check_for_responses(&rx_ring, DISARMED);
        }
    }
}

static int snic_poll(void)
{
    if (!connected)
        return 0;
    irq_pending = 0;
    int work = reap_tx();
    if (connected)
        work += receive();
    snic_push(); /* replies staged by the RX handler */
    return work;
}

static u32 tx_ring_outstanding(void) { return tx_ring.nr_ents - pvio_front_free_requests(&tx_ring); }

/* An interrupt, or completions (or an impossible completion index: the poll stops then). */
static int work_waiting(void)
{
    return irq_pending || pvio_front_unconsumed_responses(&rx_ring) != 0 ||
           (tx_ring_outstanding() && pvio_front_unconsumed_responses(&tx_ring) != 0);
}

static void snic_wait(void)
{
    u64 seen = events_seen;
    for (u64 i = 0; i < spin; i++) { /* poll while busy, giving the monitor the CPU each round */
        if (work_waiting() || events_seen != seen)
            return;
        __asm__ __volatile__("hlt" ::: "memory"); /* ends this vCPU slice: the device runs */
    }
    /* Idle: re-arm, then re-check so a completion published meanwhile is not slept through. */
    pvio_front_final_check_for_responses(&rx_ring, 1);
    rx_armed = 1;
    if (!tx_nfree)
        pvio_front_final_check_for_responses(&tx_ring, tx_ring_outstanding() / 2); /* 0 arms at +1 */
    if (work_waiting())
        return;
    drv_stats.rearms++;
    wait_for_events();
}

/* Test mode baddesc: one TX descriptor naming pool buffer 0xFFFF (the pool has NR_BUFS). */
void snic_hostile_bad_descriptor(void)
{
    if (!tx_nfree)
        reap_tx();
    if (!tx_nfree)
        return;
    u16 idx = tx_free[--tx_nfree];
    put_desc(&tx_ring, 0xFFFF, 64, idx);
    tx_unpushed++;
    tx_out[idx] = 1;
    snic_push();
}

const struct nic_ops snic_ops = {
    .name = "smartnic",
    .init = snic_init,
    .mac = snic_mac,
    .connected = snic_connected,
    .error = snic_error,
    .xmit = snic_xmit,
    .push = snic_push,
    .poll = snic_poll,
    .wait = snic_wait,
    .tx_outstanding = snic_tx_outstanding,
};
