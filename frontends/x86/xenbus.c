/* The xenbus client: xs_wire messages over the xenstore ring page.
 *
 * One request is outstanding at a time (the kernel's main flow is single-threaded):
 * xs_talk writes the 16-byte header and the payload into the request ring, kicks the
 * store port, and reads messages from the response ring until the reply with its req_id
 * arrives; watch events read on the way are queued (bounded) for xenbus_wait_watch.
 * Ring discipline: data, write barrier, producer index; a reader loads the producer,
 * read barrier, data, full barrier, consumer index; indices are free-running u32 byte
 * counts and a producer more than 1024 bytes ahead is impossible (the kernel stops).
 * The server only writes more output when kicked, so after finding the response ring
 * full we kick it once we have made room. */
#include "pvio.h"

#define WATCH_QUEUE 16

struct xs_ring {
    char req[XENSTORE_RING_SIZE];
    char rsp[XENSTORE_RING_SIZE];
    u32 req_cons, req_prod, rsp_cons, rsp_prod;
    u32 server_features, connection, error, evtchn_port;
};
_Static_assert(__builtin_offsetof(struct xs_ring, req_cons) == 2048, "req_cons at 2048");
_Static_assert(__builtin_offsetof(struct xs_ring, rsp_prod) == 2060, "rsp_prod at 2060");

struct xsd_msg {
    u32 type, req_id, tx_id, len;
};

static struct xs_ring *ring;
static u32 store_port;
static u32 next_req_id = 1;
static u32 req_prod_pvt, rsp_cons_pvt;
static char msg_buf[sizeof(struct xsd_msg) + XENSTORE_PAYLOAD_MAX];
static char reply[XENSTORE_PAYLOAD_MAX + 1];
static u32 reply_len;
static char watch_tokens[WATCH_QUEUE][32];
static unsigned watch_head, watch_count;
u64 xs_watch_events_dropped;

static void store_event(u32 port)
{
    (void)port; /* the scan counted the upcall; the waiting code re-reads the ring */
}

void xenbus_init(u64 ring_gpa, u32 port)
{
    ring = (struct xs_ring *)ring_gpa;
    store_port = port;
    req_prod_pvt = READ_ONCE(ring->req_prod);
    rsp_cons_pvt = READ_ONCE(ring->rsp_cons);
    bind_evtchn(port, store_event);
}

static void ring_broken(const char *what)
{
    printk("xenbus: impossible %s ring indices\n", what);
    panic("xenstore ring broken");
}

static void xs_write_bytes(const char *data, u32 len)
{
    while (len) {
        u32 cons = READ_ONCE(ring->req_cons);
        u32 used = req_prod_pvt - cons;
        if (used > XENSTORE_RING_SIZE)
            ring_broken("request");
        u32 space = XENSTORE_RING_SIZE - used;
        if (!space) {
            evtchn_send(store_port);
            wait_for_events();
            continue;
        }
        u32 off = req_prod_pvt & (XENSTORE_RING_SIZE - 1);
        u32 n = len;
        if (n > space)
            n = space;
        if (n > XENSTORE_RING_SIZE - off)
            n = XENSTORE_RING_SIZE - off;
        memcpy(ring->req + off, data, n);
        wmb(); /* the server sees the bytes before the index */
        req_prod_pvt += n;
        WRITE_ONCE(ring->req_prod, req_prod_pvt);
        data += n;
        len -= n;
    }
    evtchn_send(store_port);
}

static void xs_read_bytes(char *dst, u32 len)
{
    while (len) {
        u32 prod = READ_ONCE(ring->rsp_prod);
        rmb(); /* the index before the bytes */
        u32 avail = prod - rsp_cons_pvt;
        if (avail > XENSTORE_RING_SIZE)
            ring_broken("response");
        if (!avail) {
            wait_for_events();
            continue;
        }
        int was_full = avail == XENSTORE_RING_SIZE;
        u32 off = rsp_cons_pvt & (XENSTORE_RING_SIZE - 1);
        u32 n = len;
        if (n > avail)
            n = avail;
        if (n > XENSTORE_RING_SIZE - off)
            n = XENSTORE_RING_SIZE - off;
        memcpy(dst, ring->rsp + off, n);
        mb(); /* done reading before the server may overwrite */
        rsp_cons_pvt += n;
        WRITE_ONCE(ring->rsp_cons, rsp_cons_pvt);
        dst += n;
        len -= n;
        if (was_full)
            evtchn_send(store_port);
    }
}

/* Read one message into `reply`; returns its header. */
static struct xsd_msg xs_recv(void)
{
    struct xsd_msg hdr;
    xs_read_bytes((char *)&hdr, sizeof hdr);
    if (hdr.len > XENSTORE_PAYLOAD_MAX)
        ring_broken("message length");
    xs_read_bytes(reply, hdr.len);
    reply[hdr.len] = 0;
    reply_len = hdr.len;
    return hdr;
}

static void queue_watch_event(void)
{
    /* payload: path NUL token NUL */
    u32 plen = (u32)strlen(reply);
    if (plen + 1 >= reply_len) {
        return;
    }
    if (watch_count == WATCH_QUEUE) {
        watch_head = (watch_head + 1) % WATCH_QUEUE;
        watch_count--;
        xs_watch_events_dropped++;
    }
    strcpy_bounded(watch_tokens[(watch_head + watch_count) % WATCH_QUEUE], reply + plen + 1, 32);
    watch_count++;
}

static int error_code(void)
{
    if (!strcmp(reply, "EAGAIN"))
        return -EAGAIN;
    if (!strcmp(reply, "ENOENT"))
        return -ENOENT;
    if (!strcmp(reply, "ENOSPC"))
        return -ENOSPC;
    return -EINVAL;
}

/* Send a request whose payload is the concatenation of parts (lengths given), wait for
 * its reply.  Returns 0 (reply in `reply`/`reply_len`) or a negative errno. */
static int xs_talk(u32 type, u32 tx, const char *a, u32 alen, const char *b, u32 blen)
{
    if (alen + blen > XENSTORE_PAYLOAD_MAX)
        return -EINVAL;
    struct xsd_msg hdr = {type, next_req_id++, tx, alen + blen};
    memcpy(msg_buf, &hdr, sizeof hdr);
    memcpy(msg_buf + sizeof hdr, a, alen);
    memcpy(msg_buf + sizeof hdr + alen, b, blen);
    xs_write_bytes(msg_buf, (u32)sizeof hdr + alen + blen);
    for (;;) {
        struct xsd_msg r = xs_recv();
        if (r.type == XS_WATCH_EVENT) {
            queue_watch_event();
            continue;
        }
        if (r.req_id != hdr.req_id)
            continue; /* a stale reply: not ours */
        return r.type == XS_ERROR ? error_code() : 0;
    }
}

int xenbus_read(u32 tx, const char *path, char *out, size_t size)
{
    int rc = xs_talk(XS_READ, tx, path, (u32)strlen(path) + 1, NULL, 0);
    if (rc)
        return rc;
    u32 n = reply_len < size - 1 ? reply_len : (u32)size - 1;
    memcpy(out, reply, n);
    out[n] = 0;
    return 0;
}

int xenbus_write(u32 tx, const char *path, const char *value)
{
    return xs_talk(XS_WRITE, tx, path, (u32)strlen(path) + 1, value, (u32)strlen(value));
}

int xenbus_transaction_start(u32 *tx)
{
    int rc = xs_talk(XS_TRANSACTION_START, 0, "", 1, NULL, 0);
    if (rc)
        return rc;
    u64 id;
    if (parse_u64(reply, &id) || id > 0xFFFFFFFFu)
        return -EINVAL;
    *tx = (u32)id;
    return 0;
}

int xenbus_transaction_end(u32 tx, int abort)
{
    return xs_talk(XS_TRANSACTION_END, tx, abort ? "F" : "T", 2, NULL, 0);
}

static int watch_op(u32 type, const char *path, const char *token)
{
    char buf[256];
    u32 plen = (u32)strlen(path) + 1, tlen = (u32)strlen(token) + 1;
    if (plen + tlen > sizeof buf)
        return -EINVAL;
    memcpy(buf, path, plen);
    memcpy(buf + plen, token, tlen);
    return xs_talk(type, 0, buf, plen + tlen, NULL, 0);
}

int xenbus_watch(const char *path, const char *token)
{
    return watch_op(XS_WATCH, path, token);
}

int xenbus_unwatch(const char *path, const char *token)
{
    return watch_op(XS_UNWATCH, path, token);
}

/* Take one queued event of `token` (1), or none is queued (0). */
static int take_watch_event(const char *token)
{
    for (unsigned i = 0; i < watch_count; i++) {
        unsigned at = (watch_head + i) % WATCH_QUEUE;
        if (!strcmp(watch_tokens[at], token)) {
            /* remove entry i, keeping order */
            for (unsigned j = i; j + 1 < watch_count; j++)
                memcpy(watch_tokens[(watch_head + j) % WATCH_QUEUE],
                       watch_tokens[(watch_head + j + 1) % WATCH_QUEUE], 32);
            watch_count--;
            return 1;
        }
    }
    return 0;
}

/* Wait until a watch event with `token` arrives (queued ones first). */
int xenbus_wait_watch(const char *token)
{
    for (;;) {
        if (take_watch_event(token))
            return 0;
        struct xsd_msg r = xs_recv();
        if (r.type == XS_WATCH_EVENT)
            queue_watch_event();
    }
}

/* Without blocking: read the whole messages already on the response ring (with no request
 * outstanding they are watch events), then take one event of `token` if there is one. */
int xenbus_watch_fired(const char *token)
{
    for (;;) {
        u32 prod = READ_ONCE(ring->rsp_prod);
        rmb();
        u32 avail = prod - rsp_cons_pvt;
        if (avail > XENSTORE_RING_SIZE)
            ring_broken("response");
        if (avail < sizeof(struct xsd_msg))
            break;
        struct xsd_msg hdr;
        for (u32 k = 0; k < sizeof hdr; k++) /* peek at the header, not consuming it */
            ((char *)&hdr)[k] = ring->rsp[(rsp_cons_pvt + k) & (XENSTORE_RING_SIZE - 1)];
        if (hdr.len > XENSTORE_PAYLOAD_MAX)
            ring_broken("message length");
        if (avail < sizeof hdr + hdr.len)
            break; /* the rest is not written yet */
        struct xsd_msg r = xs_recv();
        if (r.type == XS_WATCH_EVENT)
            queue_watch_event();
    }
    return take_watch_event(token);
}

int xenbus_read_int(const char *path, u64 *out)
{
    char buf[32];
    int rc = xenbus_read(0, path, buf, sizeof buf);
    return rc ? rc : parse_u64(buf, out);
}

/* Wait until the XenbusState at `path` is one of accept_mask's (bit n = state n). */
int xenbus_wait_state(const char *path, unsigned accept_mask)
{
    int rc = xenbus_watch(path, "state");
    if (rc)
        return rc;
    for (;;) {
        u64 state = 0;
        if (!xenbus_read_int(path, &state) && state < 32 && (accept_mask >> state & 1)) {
            xenbus_unwatch(path, "state");
            /* drop the events of this watch still queued */
            for (unsigned i = 0; i < watch_count;) {
                unsigned at = (watch_head + i) % WATCH_QUEUE;
                if (!strcmp(watch_tokens[at], "state")) {
                    for (unsigned j = i; j + 1 < watch_count; j++)
                        memcpy(watch_tokens[(watch_head + j) % WATCH_QUEUE],
                               watch_tokens[(watch_head + j + 1) % WATCH_QUEUE], 32);
                    watch_count--;
                } else {
                    i++;
                }
            }
            return (int)state;
        }
        xenbus_wait_watch("state");
    }
}
