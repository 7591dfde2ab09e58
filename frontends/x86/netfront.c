/* netfront: the guest half of the Xen vif split driver, in C, speaking the same netif
 * protocol as pvio's Python netfront (frontends/netfront.py) and Linux's.
 *
 * Handshake: read backend, backend-id and mac from our device directory, wait for the
 * backend's InitWait, require feature-rx-copy=1; allocate both ring pages and initialise
 * them as front rings (pvio_front_init: SHARED_RING_INIT + FRONT_RING_INIT), grant them,
 * allocate an unbound event channel for the backend, grant the TX pool (one page per
 * ring slot, read-only, granted once) and the RX buffers (writable), post every RX
 * buffer; then write tx-ring-ref, rx-ring-ref, event-channel, request-rx-copy,
 * feature-rx-notify, feature-sg and state=Connected in one transaction (retried on
 * EAGAIN), and wait for the backend's Connected (or Closed: refused).
 *
 * Rings: both are struct pvio_front_ring, driven only through ring.c (the ring every
 * pvio component uses): requests go in with pvio_front_put_requests and are published
 * with pvio_front_push_requests, responses come out with pvio_front_take_responses, and
 * the idle path arms with pvio_front_final_check_for_responses.  This file keeps only
 * the driver's own state: which TX pool slots are free or in flight, which RX buffers
 * are posted, and whether TX requests are waiting to be published.
 *
 * Hardening (the backend is untrusted): take_responses copies each response out of the
 * shared ring once and only the copy is used; it refuses a producer index more than the
 * outstanding requests ahead (PVIO_RING_EOVERFLOW), which disconnects the device, as do
 * a response id outside the ring or not outstanding (TX) / not posted (RX), an RX
 * fragment crossing its page, or a packet of more than 18 slots, each with a logged
 * reason; received data is copied out of the buffer once before the buffer is re-posted.
 *
 * A backend that goes away (its driver stopped or crashed: backend Closing, Closed while
 * online stays 1, seen through a watch checked on every poll without blocking): what it
 * answered is taken, every grant revoked once it is Closed (a page it still maps is never
 * reused), Closed, Initialising, and the handshake runs again with the next backend.
 *
 * Notifications: a push notifies only when the backend's event index asks for it
 * (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY); before sleeping, the final check arms the TX
 * response event at half the outstanding requests ahead (plus one) and the RX event at
 * the next response, then re-checks (no lost wake-up). */
#include "pvio.h"

#define FRAME_MAX 65536

struct netfront_stats nf_stats;
static struct pvio_front_ring tx_ring, rx_ring;
static u32 tx_unpushed; /* TX requests put on the ring since the last push */
static u32 tx_ring_ref, rx_ring_ref, port;
static u16 backend_id;
static u8 mac[6];
static u64 tx_page[NET_TX_RING_SIZE], rx_page[NET_RX_RING_SIZE];
static u32 tx_gref[NET_TX_RING_SIZE], rx_gref[NET_RX_RING_SIZE];
static u16 tx_free[NET_TX_RING_SIZE];
static u32 tx_nfree;
static u8 tx_outstanding[NET_TX_RING_SIZE], rx_posted[NET_RX_RING_SIZE];
static struct netif_tx_response tx_rsp[NET_TX_RING_SIZE]; /* copies taken from the ring */
static struct netif_rx_response rx_rsp[NET_RX_RING_SIZE];
static struct netif_rx_request rx_req[NET_RX_RING_SIZE];   /* RX buffers to (re-)post */
static u8 frame_buf[FRAME_MAX];
static u32 frame_len, frame_slots;
static int frame_discard;
static int connected;
static const char *error;
static netfront_rx_t rx_handler;
static char dir[64], backend[128];
static unsigned my_domid;
static u64 tx_ring_gpa, rx_ring_gpa;
static const char *hs_mode = "";
static u32 reconnects;
#define BACKEND_TOKEN "nf-backend"

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

static void init_ring(struct pvio_front_ring *r, u64 gpa, u32 ent, u32 req, u32 rsp, u32 size)
{
    if (pvio_front_init(r, (void *)gpa, PAGE_SIZE, ent, req, rsp) || r->nr_ents != size)
        panic("netfront: cannot initialise a ring page");
}

/* Post the RX buffers rx_req[0..n): one batch put on the ring, published. */
static int post_rx(u32 n)
{
    for (u32 i = 0; i < n; i++)
        rx_posted[rx_req[i].id] = 1;
    pvio_front_put_requests(&rx_ring, (const char *)rx_req, n);
    return pvio_front_push_requests(&rx_ring);
}

/* A page for the device: the one the last connection used (its grant revoked), zeroed,
 * or a new one (first connection, or the old one is still mapped by the backend). */
static u64 device_page(u64 old)
{
    if (!old)
        return alloc_page();
    memset((void *)old, 0, PAGE_SIZE);
    return old;
}

static void setup_rings(void)
{
    u64 tx_gpa = tx_ring_gpa = device_page(tx_ring_gpa), rx_gpa = rx_ring_gpa = device_page(rx_ring_gpa);
    init_ring(&tx_ring, tx_gpa, sizeof(union netif_tx_sring_entry), sizeof(struct netif_tx_request),
              sizeof(struct netif_tx_response), NET_TX_RING_SIZE);
    init_ring(&rx_ring, rx_gpa, sizeof(union netif_rx_sring_entry), sizeof(struct netif_rx_request),
              sizeof(struct netif_rx_response), NET_RX_RING_SIZE);
    tx_ring_ref = gnttab_grant_access(backend_id, tx_gpa >> PAGE_SHIFT, 0);
    rx_ring_ref = gnttab_grant_access(backend_id, rx_gpa >> PAGE_SHIFT, 0);
    if (evtchn_alloc_unbound(backend_id, &port))
        panic("netfront: cannot allocate an event channel");
    bind_evtchn(port, netfront_event);
    for (u32 i = 0; i < NET_TX_RING_SIZE; i++) {
        tx_page[i] = device_page(tx_page[i]);
        tx_gref[i] = gnttab_grant_access(backend_id, tx_page[i] >> PAGE_SHIFT, 1);
        tx_free[tx_nfree++] = (u16)(NET_TX_RING_SIZE - 1 - i);
    }
    for (u32 i = 0; i < NET_RX_RING_SIZE; i++) {
        rx_page[i] = device_page(rx_page[i]);
        rx_gref[i] = gnttab_grant_access(backend_id, rx_page[i] >> PAGE_SHIFT, 0);
        rx_req[i] = (struct netif_rx_request){.id = (u16)i, .gref = rx_gref[i]};
    }
    post_rx(NET_RX_RING_SIZE); /* before Connected: the backend is not listening yet */
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

static int handshake(const char *mode);

int netfront_init(unsigned domid, netfront_rx_t rx, const char *mode)
{
    char buf[128];
    u64 id;
    my_domid = domid;
    rx_handler = rx;
    hs_mode = mode;
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
    return handshake(mode);
}

/* InitWait, rings, keys, Connected: the first connection, and each reconnection. */
static int handshake(const char *mode)
{
    char buf[128], path[192];
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
    /* Follow the backend: its driver may stop or crash (Closing, Closed) and come back. */
    if (!xenbus_watch(path, BACKEND_TOKEN))
        xenbus_wait_watch(BACKEND_TOKEN); /* the event a watch fires when registered */
    printk("netfront: vif%u.0 connected, mac %02x:%02x:%02x:%02x:%02x:%02x\n", my_domid, mac[0], mac[1],
           mac[2], mac[3], mac[4], mac[5]);
    return 0;
}

/* Count a push's outcome, and notify the backend if its event index asked for it. */
static void notify_if(int notify)
{
    if (notify) {
        nf_stats.notifies++;
        evtchn_send(port);
    } else {
        nf_stats.suppressed++;
    }
}

void netfront_push(void)
{
    if (connected && tx_unpushed) {
        tx_unpushed = 0;
        notify_if(pvio_front_push_requests(&tx_ring));
    }
}

static void stage_slot(u16 sid, u32 gref, u16 flags, u16 size)
{
    struct netif_tx_request req = {.gref = gref, .offset = 0, .flags = flags, .id = sid, .size = size};
    pvio_front_put_requests(&tx_ring, (const char *)&req, 1); /* room: sid came from tx_free */
    tx_unpushed++;
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
        stage_slot(sid, tx_gref[sid], k + 1 < nslots ? NETTXF_MORE_DATA : 0, (u16)(k == 0 ? len : chunk));
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
    u16 sid = tx_free[--tx_nfree];
    stage_slot(sid, tx_gref[sid], 0, (u16)len);
    nf_stats.tx_packets++;
    return 0;
}

static int reap_tx(void)
{
    int n = pvio_front_take_responses(&tx_ring, (char *)tx_rsp, NET_TX_RING_SIZE);
    if (n < 0) {
        nf_fail("impossible TX response producer index");
        return 0;
    }
    for (int i = 0; i < n; i++) {
        u16 id = tx_rsp[i].id;
        if (tx_rsp[i].status == NETIF_RSP_NULL)
            continue; /* an extra-info slot's answer: no buffer, no id (as Linux) */
        if (id >= NET_TX_RING_SIZE || !tx_outstanding[id]) {
            nf_fail("TX response id is not an outstanding request");
            return i;
        }
        tx_outstanding[id] = 0;
        tx_free[tx_nfree++] = id;
        if (tx_rsp[i].status != NETIF_RSP_OKAY && tx_rsp[i].status != NETIF_RSP_NULL)
            nf_stats.tx_errors++;
    }
    return n;
}

static int receive(void)
{
    int taken = pvio_front_take_responses(&rx_ring, (char *)rx_rsp, NET_RX_RING_SIZE);
    if (taken < 0) {
        nf_fail("impossible RX response producer index");
        return 0;
    }
    u32 nrepost = 0;
    int n = 0;
    for (int i = 0; i < taken; i++) {
        u16 id = rx_rsp[i].id, offset = rx_rsp[i].offset, flags = rx_rsp[i].flags;
        s16 status = rx_rsp[i].status;
        if (id >= NET_RX_RING_SIZE || !rx_posted[id]) {
            nf_fail("RX response id is not a posted buffer");
            return n;
        }
        rx_posted[id] = 0;
        rx_req[nrepost++] = (struct netif_rx_request){.id = id, .gref = rx_gref[id]};
        if (status < 0) {
            nf_stats.rx_errors++;
            frame_len = frame_slots = 0;
            frame_discard = 0;
            continue;
        }
        if (status == 0) { /* the rules of pvio.ringbuf.netif.rx_slot_problem */
            nf_fail("RX response of 0 bytes");
            return n;
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
    if (nrepost)
        notify_if(post_rx(nrepost));
    return n + (int)nrepost;
}

static void backend_changed(void);

int netfront_poll(void)
{
    if (connected && xenbus_watch_fired(BACKEND_TOKEN))
        backend_changed();
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
    u32 outstanding = tx_ring.nr_ents - pvio_front_free_requests(&tx_ring);
    int tx_work = pvio_front_final_check_for_responses(&tx_ring, outstanding / 2 + 1);
    int rx_work = pvio_front_final_check_for_responses(&rx_ring, 1);
    return tx_work || rx_work; /* PVIO_RING_EOVERFLOW too: the poll disconnects */
}

/* Test mode badring: break the protocol on purpose by publishing a req_prod far past the
 * requests on the ring.  ring.c only ever publishes what was put, so this (test-only) code
 * writes the shared index directly. */
void netfront_hostile_push(u32 extra)
{
    wmb();
    WRITE_ONCE(tx_ring.sring->req_prod, tx_ring.req_prod_pvt + extra);
    evtchn_send(port);
}

void netfront_hostile_bad_tx_gref(void)
{
    stage_slot(tx_free[--tx_nfree], 4000, 0, 64); /* a grant reference never granted */
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

/* Revoke every grant of the connection; a page whose grant the backend still maps is
 * forgotten (never reused: the next connection gets a new page).  Returns how many were kept. */
static u32 revoke_all(void)
{
    u32 kept = 0;
    u32 *refs[2 + NET_TX_RING_SIZE + NET_RX_RING_SIZE];
    u64 *pages[2 + NET_TX_RING_SIZE + NET_RX_RING_SIZE];
    refs[0] = &tx_ring_ref, pages[0] = &tx_ring_gpa;
    refs[1] = &rx_ring_ref, pages[1] = &rx_ring_gpa;
    for (u32 i = 0; i < NET_TX_RING_SIZE; i++)
        refs[2 + i] = &tx_gref[i], pages[2 + i] = &tx_page[i];
    for (u32 i = 0; i < NET_RX_RING_SIZE; i++)
        refs[2 + NET_TX_RING_SIZE + i] = &rx_gref[i], pages[2 + NET_TX_RING_SIZE + i] = &rx_page[i];
    for (u32 i = 0; i < 2 + NET_TX_RING_SIZE + NET_RX_RING_SIZE; i++) {
        if (!gnttab_end_access(*refs[i])) {
            kept++;
            *pages[i] = 0;
        }
    }
    return kept;
}

/* The backend went Closing or Closed.  If the toolstack still wants the device (online is
 * not 0), its driver stopped or crashed: take what it answered, wait until it has let go
 * (Closed: the rings are unmapped; or InitWait: a new backend already took over), revoke
 * every grant, go Closed, then Initialising, and run the handshake again. */
static void backend_changed(void)
{
    char path[192], buf[16];
    u64 state = 0;
    snprintf(path, sizeof path, "%s/state", backend);
    if (xenbus_read_int(path, &state) || (state != XenbusStateClosing && state != XenbusStateClosed))
        return;
    snprintf(path, sizeof path, "%s/online", backend);
    if (xenbus_read(0, path, buf, sizeof buf) || !strcmp(buf, "0"))
        return; /* an unplug: nothing to reconnect to */
    printk("netfront: vif%u.0 backend closing (its driver went away): reconnecting\n", my_domid);
    int work = reap_tx();
    if (connected)
        work += receive();
    (void)work;
    if (!connected)
        return; /* the last answers broke the protocol: disconnected for that */
    connected = 0;
    snprintf(path, sizeof path, "%s/state", backend);
    xenbus_unwatch(path, BACKEND_TOKEN);
    while (xenbus_watch_fired(BACKEND_TOKEN))
        ;
    xenbus_wait_state(path, 1u << XenbusStateClosed | 1u << XenbusStateInitWait);
    u32 lost = NET_TX_RING_SIZE - tx_nfree;
    evtchn_close(port);
    u32 kept = revoke_all();
    tx_nfree = tx_unpushed = 0;
    memset(tx_outstanding, 0, sizeof tx_outstanding);
    memset(rx_posted, 0, sizeof rx_posted);
    frame_len = frame_slots = 0;
    frame_discard = 0;
    snprintf(path, sizeof path, "%s/state", dir);
    xenbus_write(0, path, "6");
    xenbus_write(0, path, "1");
    printk("netfront: vif%u.0 released: %u TX slots lost in flight, %u grants still mapped\n", my_domid, lost,
           kept);
    if (handshake(hs_mode) == 0)
        printk("netfront: vif%u.0 reconnected (%u)\n", my_domid, ++reconnects);
}
