/* mode=bench: the app pvio's bench harness drives (pvio/x86_kind.py, docs/devices.md).
 *
 * At boot the guest allocates one mailbox page, binds VIRQ_BENCH (Xen's VIRQ_DEBUG) and
 * prints "bench: mailbox at <gpa>".  The harness writes a command into the mailbox, bumps
 * cmd_seq and raises VIRQ_BENCH (one upcall: the only cost of the control channel); the
 * guest runs it and sets done_seq.  Commands:
 *
 *   1 stream:   send `count` UDP frames of `size` bytes (5000 -> 9, the big-endian sequence
 *               number opening the payload, byte 42) to dst_mac/dst_ip, as fast as the NIC
 *               takes them;
 *   2 pingpong: `count` round trips: one UDP frame 40000 -> 7 (UDP echo), wait for the
 *               answer carrying the same sequence number, next.
 *
 * `rate` (frames or round trips per second; 0: as fast as possible) paces both: frame (trip)
 * k is due at t0 + k/rate in system time (vcpu_time_info, from t0 = the command's start).
 * At each wake-up the sender sends every frame that is due (as the Python harness does),
 * then arms set_timer_op for the next one's time and idles in the driver's wait (which
 * returns on any event: VIRQ_TIMER, the NIC's interrupt).  Each timer armed is counted
 * (timer_sets); its VIRQ_TIMER upcall is a counted interrupt like any other.  A paced
 * ping-pong also sums the round trips in system time (rtt_ns).
 *
 * Every guest in mode=bench is also a sink: frames to UDP port 9 are counted (rx_stream)
 * and their sequence numbers checked in order (rx_next_seq; rx_bad counts the others);
 * everything else goes to the network stack (ARP, ICMP echo, UDP echo).
 *
 * The mailbox also gives the address of the emulated-NIC / smart-NIC driver's statistics
 * (struct nicdrv_stats, pvio.h: frames, interrupts, refused completions, rx/tx errors,
 * doorbells, re-arms), which the harness reads from guest memory at no guest cost. */
#include "pvio.h"

/* struct bench_mbox: pvio_abi.h (pvio.abi.bench) */

static struct bench_mbox *mbox;
static u8 my_ip[4];
static volatile int kicked;
static int pong_wait, pong_ok;
static u32 pong_seq;

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

/* Pacing.  VIRQ_TIMER fires no earlier than the deadline in the hypervisor's clock; the time
 * the guest reads is floor(clock * 1e9) at its slice's start, which can be 1 ns short of a
 * deadline that was just reached: SLACK_NS absorbs that rounding. */
#define SLACK_NS 1000
static u64 t0, armed_for;

static void on_timer(u32 p) { (void)p; /* the wake-up is the point: the loop reads the time */ }

static u64 due_at(u32 k, u32 rate) { return t0 + (u64)k * 1000000000UL / rate; }

static int reached(u64 deadline) { return now_ns() + SLACK_NS >= deadline; }

/* Idle until an event; the one-shot timer is armed for `deadline` (once per deadline). */
static void wait_until(u64 deadline)
{
    if (armed_for != deadline) {
        armed_for = deadline;
        mbox->timer_sets++;
        set_timer(deadline);
    }
    nic->wait();
}

static void on_kick(u32 p)
{
    (void)p;
    kicked = 1;
}

void bench_init(void)
{
    char buf[32];
    u32 port;
    if (!cmdline_get("ip", buf, sizeof buf) || parse_ip(buf, my_ip))
        parse_ip("10.0.0.2", my_ip);
    mbox = (struct bench_mbox *)alloc_page();
    mbox->magic = BENCH_MBOX_MAGIC;
    mbox->drv_stats = (u64)&drv_stats;
    if (evtchn_bind_virq(VIRQ_BENCH, &port))
        panic("bench: cannot bind VIRQ_BENCH");
    bind_evtchn(port, on_kick);
    if (evtchn_bind_virq(VIRQ_TIMER, &port))
        panic("bench: cannot bind VIRQ_TIMER");
    bind_evtchn(port, on_timer);
    printk("bench: mailbox at %lx\n", (u64)mbox);
}

void bench_rx(const u8 *f, u32 len)
{
    if (len >= 46 && get16(f + 12) == 0x0800 && f[14] == 0x45 && f[23] == 17 && !memcmp(f, nic->mac(), 6)) {
        u16 sport = get16(f + 34), dport = get16(f + 36);
        u32 seq = get32(f + 42);
        if (dport == 9 && sport == 5000) {
            mbox->rx_stream++;
            if (seq == mbox->rx_next_seq)
                mbox->rx_next_seq++;
            else
                mbox->rx_bad++;
            return;
        }
        if (pong_wait && sport == 7 && dport == 40000 && seq == pong_seq) {
            pong_ok = 1;
            return;
        }
    }
    netstack_input(f, len);
}

static void make_frame(u8 *t, u32 len, u16 sport, u16 dport)
{
    u32 ulen = len - 34;
    memset(t, 0, len);
    memcpy(t, mbox->dst_mac, 6);
    memcpy(t + 6, nic->mac(), 6);
    t[12] = 0x08, t[13] = 0x00;
    u8 *ip = t + 14;
    ip[0] = 0x45, ip[2] = (u8)((len - 14) >> 8), ip[3] = (u8)(len - 14), ip[8] = 64, ip[9] = 17;
    memcpy(ip + 12, my_ip, 4);
    memcpy(ip + 16, mbox->dst_ip, 4);
    u16 csum = inet_checksum(ip, 20, 0);
    ip[10] = (u8)(csum >> 8), ip[11] = (u8)csum;
    u8 *udp = t + 34;
    udp[0] = (u8)(sport >> 8), udp[1] = (u8)sport, udp[2] = (u8)(dport >> 8), udp[3] = (u8)dport;
    udp[4] = (u8)(ulen >> 8), udp[5] = (u8)ulen;
}

static void set_seq(u8 *t, u32 seq)
{
    t[42] = (u8)(seq >> 24), t[43] = (u8)(seq >> 16), t[44] = (u8)(seq >> 8), t[45] = (u8)seq;
}

static u8 tmpl[1514];

static void stream(u32 count, u32 len, u32 rate)
{
    make_frame(tmpl, len, 5000, 9);
    u32 sent = 0;
    while (sent < count && nic->connected()) {
        u32 staged = 0;
        u64 now = rate ? now_ns() + SLACK_NS : 0;
        while (sent < count && (!rate || due_at(sent, rate) <= now)) {
            set_seq(tmpl, sent);
            if (nic->xmit(tmpl, len))
                break;
            sent++, staged++;
        }
        nic->push();
        if (nic->poll())
            continue;
        if (rate && sent < count && due_at(sent, rate) > now) {
            wait_until(due_at(sent, rate)); /* nothing due: sleep until the next frame's time */
            continue;
        }
        if (!staged)
            nic->wait(); /* no TX room: wait for the driver */
    }
    mbox->sent = sent;
}

static void pingpong(u32 count, u32 len, u32 rate)
{
    make_frame(tmpl, len, 40000, 7);
    for (u32 trip = 0; trip < count && nic->connected(); trip++) {
        while (rate && !reached(due_at(trip, rate)) && nic->connected()) {
            if (!nic->poll())
                wait_until(due_at(trip, rate));
        }
        u64 sent_at = rate ? now_ns() : 0;
        set_seq(tmpl, trip);
        pong_seq = trip, pong_ok = 0, pong_wait = 1;
        while (nic->xmit(tmpl, len) == -ENOSPC && nic->connected()) {
            if (!nic->poll())
                nic->wait();
        }
        nic->push();
        mbox->sent++;
        while (!pong_ok && nic->connected()) {
            if (nic->poll())
                continue;
            if (!pong_ok)
                nic->wait();
        }
        pong_wait = 0;
        if (pong_ok)
            mbox->answered++;
        if (rate)
            mbox->rtt_ns += now_ns() - sent_at;
    }
}

void bench_loop(void)
{
    u32 done = READ_ONCE(mbox->cmd_seq);
    for (;;) {
        u32 seq = READ_ONCE(mbox->cmd_seq);
        if (seq != done) {
            kicked = 0;
            u32 cmd = mbox->cmd, count = mbox->count, size = mbox->size, rate = mbox->rate;
            mbox->status = BENCH_ST_OK;
            t0 = rate ? now_ns() : 0;
            armed_for = 0;
            if (size < 46 || size > 1514 || (cmd != BENCH_CMD_STREAM && cmd != BENCH_CMD_PINGPONG) || rate > 1000000000)
                mbox->status = BENCH_ST_BAD_COMMAND;
            else if (cmd == BENCH_CMD_STREAM)
                stream(count, size, rate);
            else
                pingpong(count, size, rate);
            if (!nic->connected())
                mbox->status = BENCH_ST_NIC_GONE;
            done = seq;
            WRITE_ONCE(mbox->done_seq, seq);
            continue;
        }
        if (nic->poll())
            continue;
        if (!nic->connected()) {
            wait_for_events();
            continue;
        }
        if (!kicked)
            nic->wait();
    }
}
