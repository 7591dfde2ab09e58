/* The emulated NIC driver (docs/devices.md, "Emulated NIC register map"): an old ISA-style
 * driver in which every register access is an `in`/`out` instruction (cmd_line
 * emu_io=pio, the default) or an MMIO load/store (emu_io=mmio), i.e. one exit each.
 *
 *   init: CMD=RESET; STATUS (all-ones: no card); MAC_LO, MAC_HI, IRQ; bind the IRQ's VIRQ;
 *         IMR=ROK|TOK|RXOVW|TER; CMD=ENABLE; STATUS must say ENABLED.
 *   send: one TX buffer in the card: TXLEN=n, ceil(n/4) 32-bit writes of TXDATA, CMD=TX,
 *         then nothing more until TOK/TER (frames wait in a software queue meanwhile).
 *   IRQ:  the upcall handler only records it; the poll reads ISR, acknowledges exactly
 *         those bits (first, so a new event raises the line again), restarts TX on
 *         TOK/TER and on ROK/RXOVW drains the FIFO: while (n = RXLEN): ceil(n/4) reads of
 *         RXDATA, CMD=RX_POP.
 *
 * Hardened: a length the card reports outside 14..1518 is refused (the frame popped and
 * counted), and one poll drains at most RX_BUDGET frames. */
#include "pvio.h"

#define TXQ 64 /* frames queued in the driver while the card's one TX buffer is busy */
#define RX_BUDGET 64

static int use_mmio, connected;
static u16 pio_base;
static u64 mmio_base;
static const char *error;
static u8 mac[6];
static u32 port;
static volatile int irq_pending;
static int tx_busy;
static u8 txq[TXQ][EMUNIC_MAX_FRAME + 4] __attribute__((aligned(4)));
static u16 txq_len[TXQ];
static u32 txq_head, txq_tail;
static u32 rxbuf[(EMUNIC_MAX_FRAME + 3) / 4];
static netfront_rx_t rx_handler;

static u32 rd(u32 reg)
{
    u32 v;
    if (use_mmio)
        return *(volatile u32 *)(mmio_base + reg);
    __asm__ __volatile__("inl %w1, %0" : "=a"(v) : "Nd"((u16)(pio_base + reg)) : "memory");
    return v;
}

static void wr(u32 reg, u32 v)
{
    if (use_mmio)
        *(volatile u32 *)(mmio_base + reg) = v;
    else
        __asm__ __volatile__("outl %0, %w1" : : "a"(v), "Nd"((u16)(pio_base + reg)) : "memory");
}

static const u8 *emu_mac(void) { return mac; }
static int emu_connected(void) { return connected; }
static const char *emu_error(void) { return error; }
static u32 emu_tx_outstanding(void) { return txq_tail - txq_head + (u32)tx_busy; }

static void on_irq(u32 p)
{
    (void)p;
    irq_pending = 1; /* the main loop reads ISR: handlers only record work */
}

static int emu_init(unsigned domid, netfront_rx_t rx, const char *mode)
{
    char buf[16];
    (void)mode;
    rx_handler = rx;
    use_mmio = cmdline_get("emu_io", buf, sizeof buf) && !strcmp(buf, "mmio");
    pio_base = EMUNIC_PIO_BASE;
    mmio_base = EMUNIC_MMIO_BASE;
    wr(EMUNIC_REG_CMD, EMUNIC_CMD_RESET);
    if (rd(EMUNIC_REG_STATUS) == 0xFFFFFFFF) {
        error = "no emulated NIC at its window";
        return -ENOENT;
    }
    u32 lo = rd(EMUNIC_REG_MAC_LO), hi = rd(EMUNIC_REG_MAC_HI), virq = rd(EMUNIC_REG_IRQ);
    for (int i = 0; i < 4; i++)
        mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi, mac[5] = (u8)(hi >> 8);
    if (evtchn_bind_virq(virq, &port)) {
        error = "cannot bind the NIC's VIRQ";
        return -EINVAL;
    }
    bind_evtchn(port, on_irq);
    wr(EMUNIC_REG_IMR, EMUNIC_ISR_ROK | EMUNIC_ISR_TOK | EMUNIC_ISR_RXOVW | EMUNIC_ISR_TER);
    wr(EMUNIC_REG_CMD, EMUNIC_CMD_ENABLE);
    if (!(rd(EMUNIC_REG_STATUS) & EMUNIC_ST_ENABLED)) {
        error = "the emulated NIC did not enable";
        return -EIO;
    }
    connected = 1;
    printk("emunic: dom%u card up (%s), mac %02x:%02x:%02x:%02x:%02x:%02x, virq %u\n", domid,
           use_mmio ? "mmio" : "pio", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], virq);
    return 0;
}

static int emu_xmit(const u8 *frame, u32 len)
{
    if (!connected)
        return -EIO;
    if (len < 14 || len > EMUNIC_MAX_FRAME)
        return -EINVAL;
    if (txq_tail - txq_head >= TXQ)
        return -ENOSPC;
    u8 *slot = txq[txq_tail % TXQ];
    memcpy(slot, frame, len);
    memset(slot + len, 0, 4); /* the last 32-bit write carries zeros past the frame */
    txq_len[txq_tail % TXQ] = (u16)len;
    txq_tail++;
    return 0;
}

/* Start the head frame if the card's TX buffer is free: TXLEN, the data words, CMD TX. */
static void emu_push(void)
{
    if (!connected || tx_busy || txq_head == txq_tail)
        return;
    const u32 *words = (const u32 *)txq[txq_head % TXQ];
    u32 len = txq_len[txq_head % TXQ];
    txq_head++;
    tx_busy = 1;
    wr(EMUNIC_REG_TXLEN, len);
    for (u32 i = 0; i < (len + 3) / 4; i++)
        wr(EMUNIC_REG_TXDATA, words[i]);
    drv_stats.tx_packets++;
    wr(EMUNIC_REG_CMD, EMUNIC_CMD_TX); /* the card sends now; TOK (or TER) raises the IRQ */
}

static int drain_rx(void)
{
    int n = 0;
    u32 len;
    while (n < RX_BUDGET && (len = rd(EMUNIC_REG_RXLEN)) != 0) {
        if (len < 14 || len > EMUNIC_MAX_FRAME) { /* a card that says so is broken: drop it */
            drv_stats.rx_errors++;
            wr(EMUNIC_REG_CMD, EMUNIC_CMD_RX_POP);
            continue;
        }
        for (u32 i = 0; i < (len + 3) / 4; i++)
            rxbuf[i] = rd(EMUNIC_REG_RXDATA);
        wr(EMUNIC_REG_CMD, EMUNIC_CMD_RX_POP);
        drv_stats.rx_packets++;
        n++;
        rx_handler((const u8 *)rxbuf, len);
    }
    if (n == RX_BUDGET)
        irq_pending = 1; /* more may wait: come back before sleeping */
    return n;
}

static int emu_poll(void)
{
    if (!connected)
        return 0;
    int work = 0;
    if (irq_pending) {
        irq_pending = 0; /* before reading ISR: a later edge sets it again */
        u32 isr = rd(EMUNIC_REG_ISR);
        if (!isr || isr == 0xFFFFFFFF) {
            drv_stats.spurious++;
        } else {
            drv_stats.irqs++;
            wr(EMUNIC_REG_ISR, isr); /* acknowledge first */
            if (isr & (EMUNIC_ISR_TOK | EMUNIC_ISR_TER)) {
                if (isr & EMUNIC_ISR_TER)
                    drv_stats.tx_errors++;
                tx_busy = 0;
                work++;
            }
            if (isr & EMUNIC_ISR_RXOVW)
                drv_stats.rx_errors++;
            if (isr & (EMUNIC_ISR_ROK | EMUNIC_ISR_RXOVW))
                work += drain_rx();
        }
    }
    emu_push(); /* the next queued frame (and replies staged by the RX handler) */
    return work;
}

static void emu_wait(void)
{
    if (!irq_pending)
        wait_for_events();
}

/* Test mode badreg: wait for the card to be idle, then a transmit of 4000 bytes (TER,
 * counted by the card as tx_bad_length) and a write to an offset with no register. */
void emunic_hostile_bad_registers(void)
{
    while (tx_busy && connected) {
        if (!emu_poll())
            emu_wait();
    }
    tx_busy = 1; /* the TER interrupt frees it */
    wr(EMUNIC_REG_TXLEN, 4000);
    wr(EMUNIC_REG_CMD, EMUNIC_CMD_TX);
    wr(0x30, 0xDEAD);
}

const struct nic_ops emunic_ops = {
    .name = "emulated",
    .init = emu_init,
    .mac = emu_mac,
    .connected = emu_connected,
    .error = emu_error,
    .xmit = emu_xmit,
    .push = emu_push,
    .poll = emu_poll,
    .wait = emu_wait,
    .tx_outstanding = emu_tx_outstanding,
};
