/* netfront: the guest half of the Xen vif split driver, in C, speaking the same netif
 * protocol as pvio's Python netfront (frontends/netfront.py) and Linux's.
 *
 * Handshake: read backend, backend-id and mac from our device directory, wait for the
 * backend's InitWait, require feature-rx-copy=1; allocate and grant both ring pages,
 * allocate an unbound event channel for the backend, grant the TX pool (one page per
 * ring slot, read-only, granted once) and the RX buffers (writable), post every RX
 * buffer; then write tx-ring-ref, rx-ring-ref, event-channel, request-rx-copy,
 * feature-rx-notify, feature-sg and state=Connected in one transaction (retried on
 * EAGAIN), and wait for the backend's Connected (or Closed: refused).
 *
 * Hardening (the backend is untrusted): every response is copied out of the shared
 * ring once (one volatile load of the whole slot) and only the copy is used; a
 * producer index more than the outstanding requests ahead, a response id outside the
 * ring or not outstanding (TX) / not posted (RX), an RX fragment crossing its page, or
 * a packet of more than 18 slots disconnects the device with a logged reason; received
 * data is copied out of the buffer once before the buffer is re-posted.
 *
 * Notifications: pushes notify only when the backend's event index asks for it
 * (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY); before sleeping, the final check arms the TX
 * response event at half the outstanding requests and the RX event at the next
 * response, then re-checks (no lost wake-up). */
#include "pvio.h"

#define TX_SLOT(i) ((u8 *)tx_sring + sizeof(struct pvio_sring) + ((i) & (NET_TX_RING_SIZE - 1)) * sizeof(union netif_tx_sring_entry))
#define RX_SLOT(i) ((u8 *)rx_sring + sizeof(struct pvio_sring) + ((i) & (NET_RX_RING_SIZE - 1)) * sizeof(union netif_rx_sring_entry))
#define FRAME_MAX 65536

struct netfront_stats nf_stats;
static struct pvio_sring *tx_sring, *rx_sring;
static u32 tx_req_prod_pvt, tx_pushed, tx_rsp_cons;
static u32 rx_req_prod_pvt, rx_pushed, rx_rsp_cons;
static u32 tx_ring_ref, rx_ring_ref, port;
static u16 backend_id;
static u8 mac[6];
static u64 tx_page[NET_TX_RING_SIZE], rx_page[NET_RX_RING_SIZE];
static u32 tx_gref[NET_TX_RING_SIZE], rx_gref[NET_RX_RING_SIZE];
static u16 tx_free[NET_TX_RING_SIZE];
static u32 tx_nfree;
static u8 tx_outstanding[NET_TX_RING_SIZE], rx_posted[NET_RX_RING_SIZE];
static u16 rx_repost[NET_RX_RING_SIZE];
static u8 frame_buf[FRAME_MAX];
static u32 frame_len, frame_slots;
static int frame_discard;
static int connected;
static const char *error;
static netfront_rx_t rx_handler;
static char dir[64], backend[128];
static unsigned my_domid;

const u8 *netfront_mac(void) { return mac; }
int netfront_connected(void) { return connected; }
const char *netfront_error(void) { return error; }
u32 netfront_tx_free(void) { return tx_nfree; }
u32 netfront_tx_outstanding(void) { return NET_TX_RING_SIZE - tx_nfree; }

static void nf_fail(const char *reason)
{
    if (error)
        return;
    error = reason;
    connected = 0;
    printk("netfront: vif%u.0 disconnected: %s\n", my_domid, reason);
}

static void netfront_event(u32 p)
{
    (void)p; /* the main loop polls the rings after every upcall */
}

static int read_key(const char *key, char *out, size_t size)
{
    char path[192];
    snprintf(path, sizeof path, "%s/%s", dir, key);
    return xenbus_read(0, path, out, size);
}

static void setup_rings(void)
{
    u64 tx_gpa = alloc_page(), rx_gpa = alloc_page();
    tx_sring = (struct pvio_sring *)tx_gpa;
    rx_sring = (struct pvio_sring *)rx_gpa;
    /* SHARED_RING_INIT: producers 0, events 1 (alloc_page zeroed the rest) */
    tx_sring->req_event = tx_sring->rsp_event = 1;
    rx_sring->req_event = rx_sring->rsp_event = 1;
    tx_ring_ref = gnttab_grant_access(backend_id, tx_gpa >> PAGE_SHIFT, 0);
    rx_ring_ref = gnttab_grant_access(backend_id, rx_gpa >> PAGE_SHIFT, 0);
    if (evtchn_alloc_unbound(backend_id, &port))
        panic("netfront: cannot allocate an event channel");
    bind_evtchn(port, netfront_event);
    for (u32 i = 0; i < NET_TX_RING_SIZE; i++) {
        tx_page[i] = alloc_page();
        tx_gref[i] = gnttab_grant_access(backend_id, tx_page[i] >> PAGE_SHIFT, 1);
        tx_free[tx_nfree++] = (u16)(NET_TX_RING_SIZE - 1 - i);
    }
    for (u32 i = 0; i < NET_RX_RING_SIZE; i++) {
        rx_page[i] = alloc_page();
        rx_gref[i] = gnttab_grant_access(backend_id, rx_page[i] >> PAGE_SHIFT, 0);
        struct netif_rx_request *req = (struct netif_rx_request *)RX_SLOT(rx_req_prod_pvt++);
        req->id = (u16)i;
        req->pad = 0;
        req->gref = rx_gref[i];
        rx_posted[i] = 1;
    }
    wmb();
    rx_pushed = rx_req_prod_pvt;
    WRITE_ONCE(rx_sring->req_prod, rx_pushed);
}

static int write_keys(const char *mode)
{
    char path[192], val[32];
    static const char *const flags[][2] = {
        {"request-rx-copy", "1"}, {"feature-rx-notify", "1"}, {"feature-sg", "1"}};
    for (;;) {
        u32 tx;
        int rc = xenbus_transaction_start(&tx);
        if (rc)
            return rc;
        /* mode badgrant: publish a TX ring reference we never granted (hostile test) */
        u32 tx_ref = !strcmp(mode, "badgrant") ? 4000 : tx_ring_ref;
        snprintf(path, sizeof path, "%s/tx-ring-ref", dir);
        snprintf(val, sizeof val, "%u", tx_ref);
        rc = xenbus_write(tx, path, val);
        snprintf(path, sizeof path, "%s/rx-ring-ref", dir);
        snprintf(val, sizeof val, "%u", rx_ring_ref);
        rc = rc ? rc : xenbus_write(tx, path, val);
        snprintf(path, sizeof path, "%s/event-channel", dir);
        snprintf(val, sizeof val, "%u", port);
        rc = rc ? rc : xenbus_write(tx, path, val);
        for (unsigned i = 0; i < 3 && !rc; i++) {
            snprintf(path, sizeof path, "%s/%s", dir, flags[i][0]);
            rc = xenbus_write(tx, path, flags[i][1]);
        }
        snprintf(path, sizeof path, "%s/state", dir);
        rc = rc ? rc : xenbus_write(tx, path, "4");
        if (rc) {
            xenbus_transaction_end(tx, 1);
            return rc;
        }
        rc = xenbus_transaction_end(tx, 0);
        if (rc != -EAGAIN)
            return rc;
    }
}

int netfront_init(unsigned domid, netfront_rx_t rx, const char *mode)
{
    char buf[128];
    u64 id;
    my_domid = domid;
    rx_handler = rx;
    snprintf(dir, sizeof dir, "/local/domain/%u/device/vif/0", domid);
    if (read_key("backend", backend, sizeof backend) || read_key("backend-id", buf, sizeof buf) ||
        parse_u64(buf, &id) || id >= DOMID_SELF) {
        nf_fail("no usable backend in xenstore");
        return -ENOENT;
    }
    backend_id = (u16)id;
    if (read_key("mac", buf, sizeof buf) || parse_mac(buf, mac)) {
        nf_fail("no usable mac in xenstore");
        return -EINVAL;
    }
    char path[192];
    snprintf(path, sizeof path, "%s/state", backend);
    xenbus_wait_state(path, 1u << XenbusStateInitWait | 1u << XenbusStateConnected);
    snprintf(path, sizeof path, "%s/feature-rx-copy", backend);
    if (xenbus_read(0, path, buf, sizeof buf) || strcmp(buf, "1")) {
        nf_fail("backend lacks feature-rx-copy");
        return -EINVAL;
    }
    setup_rings();
    if (write_keys(mode)) {
        nf_fail("cannot write the frontend keys");
        return -EIO;
    }
    snprintf(path, sizeof path, "%s/state", backend);
    int state = xenbus_wait_state(path, 1u << XenbusStateConnected | 1u << XenbusStateClosed);
    if (state != XenbusStateConnected) {
        nf_fail("the backend refused the device (state Closed)");
        return -EIO;
    }
    connected = 1;
    printk("netfront: vif%u.0 connected, mac %02x:%02x:%02x:%02x:%02x:%02x\n", domid, mac[0], mac[1],
           mac[2], mac[3], mac[4], mac[5]);
    return 0;
}

/* RING_PUSH_*_AND_CHECK_NOTIFY for one ring: publish, full fence, compare the event. */
static void push_and_notify(struct pvio_sring *s, u32 *pushed, u32 prod_pvt)
{
    u32 old = *pushed;
    if (old == prod_pvt)
        return;
    wmb(); /* the backend sees the requests before the index */
    WRITE_ONCE(s->req_prod, prod_pvt);
    *pushed = prod_pvt;
    mb(); /* the index is visible before we read the backend's event */
    u32 event = READ_ONCE(s->req_event);
    if ((u32)(prod_pvt - event) < (u32)(prod_pvt - old)) {
        nf_stats.notifies++;
        evtchn_send(port);
    } else {
        nf_stats.suppressed++;
    }
}

void netfront_push(void)
{
    if (connected)
        push_and_notify(tx_sring, &tx_pushed, tx_req_prod_pvt);
}

static void stage_slot(u16 sid, u16 flags, u16 size)
{
    struct netif_tx_request *req = (struct netif_tx_request *)TX_SLOT(tx_req_prod_pvt++);
    req->gref = tx_gref[sid];
    req->offset = 0;
    req->flags = flags;
    req->id = sid;
    req->size = size;
    tx_outstanding[sid] = 1;
}

int netfront_xmit(const u8 *frame, u32 len)
{
    if (!connected)
        return -EIO;
    u32 nslots = (len + PAGE_SIZE - 1) / PAGE_SIZE;
    if (!len || len > 0xFFFF || nslots > XEN_NETIF_NR_SLOTS_MIN)
        return -EINVAL;
    if (tx_nfree < nslots)
        return -ENOSPC;
    for (u32 k = 0; k < nslots; k++) {
        u16 sid = tx_free[--tx_nfree];
        u32 chunk = len - k * PAGE_SIZE < PAGE_SIZE ? len - k * (u32)PAGE_SIZE : (u32)PAGE_SIZE;
        memcpy((void *)tx_page[sid], frame + k * PAGE_SIZE, chunk);
        stage_slot(sid, k + 1 < nslots ? NETTXF_MORE_DATA : 0, (u16)(k == 0 ? len : chunk));
    }
    nf_stats.tx_packets++;
    return 0;
}

u8 *netfront_tx_slot_buffer(void)
{
    return tx_nfree ? (u8 *)tx_page[tx_free[tx_nfree - 1]] : NULL;
}

int netfront_xmit_staged(u32 len)
{
    if (!connected || !tx_nfree || !len || len > PAGE_SIZE)
        return -ENOSPC;
    stage_slot(tx_free[--tx_nfree], 0, (u16)len);
    nf_stats.tx_packets++;
    return 0;
}

static int reap_tx(void)
{
    u32 prod = READ_ONCE(tx_sring->rsp_prod);
    if ((u32)(prod - tx_rsp_cons) > (u32)(tx_req_prod_pvt - tx_rsp_cons)) {
        nf_fail("impossible TX response producer index");
        return 0;
    }
    rmb(); /* the index before the responses */
    int n = 0;
    while (tx_rsp_cons != prod) {
        u32 raw = *(volatile u32 *)TX_SLOT(tx_rsp_cons); /* copy once */
        tx_rsp_cons++;
        u16 id = (u16)raw;
        s16 status = (s16)(raw >> 16);
        if (id >= NET_TX_RING_SIZE || !tx_outstanding[id]) {
            nf_fail("TX response id is not an outstanding request");
            return n;
        }
        tx_outstanding[id] = 0;
        tx_free[tx_nfree++] = id;
        if (status != NETIF_RSP_OKAY && status != NETIF_RSP_NULL)
            nf_stats.tx_errors++;
        n++;
    }
    return n;
}

static int receive(void)
{
    u32 prod = READ_ONCE(rx_sring->rsp_prod);
    if ((u32)(prod - rx_rsp_cons) > (u32)(rx_req_prod_pvt - rx_rsp_cons)) {
        nf_fail("impossible RX response producer index");
        return 0;
    }
    rmb();
    u32 nrepost = 0;
    int n = 0;
    while (rx_rsp_cons != prod) {
        u64 raw = *(volatile u64 *)RX_SLOT(rx_rsp_cons); /* copy once */
        rx_rsp_cons++;
        u16 id = (u16)raw, offset = (u16)(raw >> 16), flags = (u16)(raw >> 32);
        s16 status = (s16)(raw >> 48);
        if (id >= NET_RX_RING_SIZE || !rx_posted[id]) {
            nf_fail("RX response id is not a posted buffer");
            return n;
        }
        rx_posted[id] = 0;
        rx_repost[nrepost++] = id;
        if (status < 0) {
            nf_stats.rx_errors++;
            frame_len = frame_slots = 0;
            frame_discard = 0;
            continue;
        }
        if ((u32)offset + (u32)status > PAGE_SIZE) {
            nf_fail("RX response crosses its page");
            return n;
        }
        if (frame_len + (u32)status > FRAME_MAX)
            frame_discard = 1;
        else
            memcpy(frame_buf + frame_len, (u8 *)rx_page[id] + offset, (u32)status);
        frame_len += (u32)status;
        if (flags & NETRXF_MORE_DATA) {
            if (++frame_slots >= XEN_NETIF_NR_SLOTS_MIN) {
                nf_fail("RX packet of more than 18 slots");
                return n;
            }
            continue;
        }
        if (frame_discard)
            nf_stats.drops++;
        else if (frame_len) {
            nf_stats.rx_packets++;
            rx_handler(frame_buf, frame_len);
        }
        frame_len = frame_slots = 0;
        frame_discard = 0;
        n++;
    }
    for (u32 i = 0; i < nrepost; i++) {
        u16 id = rx_repost[i];
        struct netif_rx_request *req = (struct netif_rx_request *)RX_SLOT(rx_req_prod_pvt++);
        req->id = id;
        req->pad = 0;
        req->gref = rx_gref[id];
        rx_posted[id] = 1;
    }
    push_and_notify(rx_sring, &rx_pushed, rx_req_prod_pvt);
    return n + (int)nrepost;
}

int netfront_poll(void)
{
    if (!connected)
        return 0;
    int work = reap_tx();
    if (connected)
        work += receive();
    if (connected)
        netfront_push(); /* replies staged by the RX handler */
    return work;
}

int netfront_final_check(void)
{
    if (!connected)
        return 0;
    u32 outstanding = tx_req_prod_pvt - tx_rsp_cons;
    WRITE_ONCE(tx_sring->rsp_event, tx_rsp_cons + (outstanding ? outstanding / 2 + 1 : 1));
    WRITE_ONCE(rx_sring->rsp_event, rx_rsp_cons + 1);
    mb(); /* the events are visible before we re-read the producers */
    return READ_ONCE(tx_sring->rsp_prod) != tx_rsp_cons || READ_ONCE(rx_sring->rsp_prod) != rx_rsp_cons;
}

void netfront_hostile_push(u32 extra)
{
    wmb();
    WRITE_ONCE(tx_sring->req_prod, tx_req_prod_pvt + extra);
    evtchn_send(port);
}

void netfront_hostile_bad_tx_gref(void)
{
    u16 sid = tx_free[--tx_nfree];
    stage_slot(sid, 0, 64);
    ((struct netif_tx_request *)TX_SLOT(tx_req_prod_pvt - 1))->gref = 4000; /* never granted */
    netfront_push();
}

/* Teardown: Closing, wait for the backend to close (it unmaps the rings first), then
 * revoke every grant with the atomic protocol; a grant the backend still maps stays
 * granted (counted, its page never reused), then Closed. */
void netfront_close(void)
{
    char path[192];
    u32 revoked = 0, kept = 0;
    snprintf(path, sizeof path, "%s/state", dir);
    xenbus_write(0, path, "5");
    snprintf(path, sizeof path, "%s/state", backend);
    xenbus_wait_state(path, 1u << XenbusStateClosing | 1u << XenbusStateClosed);
    connected = 0;
    if (!error)
        error = "closed";
    u32 refs[2] = {tx_ring_ref, rx_ring_ref};
    for (u32 i = 0; i < 2 + NET_TX_RING_SIZE + NET_RX_RING_SIZE; i++) {
        u32 ref = i < 2 ? refs[i] : i < 2 + NET_TX_RING_SIZE ? tx_gref[i - 2] : rx_gref[i - 2 - NET_TX_RING_SIZE];
        if (gnttab_end_access(ref))
            revoked++;
        else
            kept++;
    }
    snprintf(path, sizeof path, "%s/state", dir);
    xenbus_write(0, path, "6");
    printk("netfront: vif%u.0 closed: %u grants revoked, %u still mapped\n", my_domid, revoked, kept);
}
