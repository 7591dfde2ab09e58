/*
 * pvio shared-memory ring: the operations of Xen's io/ring.h, batched.
 *
 * Barriers follow ring.h one for one, written as GCC/C11 __atomic fences:
 *   xen_wmb -> release fence    (entries visible before the producer index)
 *   xen_rmb -> acquire load     (producer index read before the entries)
 *   xen_mb  -> seq_cst fence    (our index visible before we read the peer's event)
 * Every field the peer may write is loaded once per operation with an
 * __atomic load, and every slot the peer may rewrite is copied out once.
 */
#include "ring.h"

#if __STDC_HOSTED__
#include <string.h>
#else /* compiled into a freestanding guest kernel, which brings its own */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
#endif

#define HDR_SIZE 64u

_Static_assert(sizeof(struct pvio_sring) == HDR_SIZE, "ring header is 64 bytes");
_Static_assert(sizeof(struct netif_tx_request) == 12, "netif_tx_request is 12 bytes");
_Static_assert(sizeof(struct netif_tx_response) == 4, "netif_tx_response is 4 bytes");
_Static_assert(sizeof(struct netif_rx_request) == 8, "netif_rx_request is 8 bytes");
_Static_assert(sizeof(struct netif_rx_response) == 8, "netif_rx_response is 8 bytes");
_Static_assert(sizeof(union netif_tx_sring_entry) == 12, "netif TX slot is 12 bytes");
_Static_assert(sizeof(union netif_rx_sring_entry) == 8, "netif RX slot is 8 bytes");

static inline RING_IDX load_peer(const RING_IDX *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store_own(RING_IDX *p, RING_IDX v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline char *slot(struct pvio_sring *s, unsigned int nr_ents, uint32_t ent_size, RING_IDX idx)
{
    return (char *)s + HDR_SIZE + (size_t)(idx & (nr_ents - 1)) * ent_size;
}

unsigned int pvio_ring_nr_ents(size_t bytes, size_t ent_size)
{
    if (ent_size == 0 || bytes < HDR_SIZE)
        return 0;
    size_t n = (bytes - HDR_SIZE) / ent_size;
    if (n > 0x80000000u)
        n = 0x80000000u;
    unsigned int p = 1;
    if (n == 0)
        return 0;
    while ((size_t)p * 2 <= n)
        p *= 2;
    return p;
}

static int check_sizes(void *sring, size_t bytes, uint32_t ent_size, uint32_t req_size,
                       uint32_t rsp_size, unsigned int *nr_ents)
{
    if (sring == NULL || ((uintptr_t)sring & 3u) != 0)
        return PVIO_RING_EINVAL;
    if (req_size == 0 || rsp_size == 0 || req_size > ent_size || rsp_size > ent_size)
        return PVIO_RING_EINVAL;
    *nr_ents = pvio_ring_nr_ents(bytes, ent_size);
    return *nr_ents == 0 ? PVIO_RING_EINVAL : 0;
}

int pvio_front_attach(struct pvio_front_ring *r, void *sring, size_t bytes,
                      uint32_t ent_size, uint32_t req_size, uint32_t rsp_size, RING_IDX idx)
{
    unsigned int n;
    int err = check_sizes(sring, bytes, ent_size, req_size, rsp_size, &n);
    if (err)
        return err;
    r->req_prod_pvt = idx;
    r->rsp_cons = idx;
    r->nr_ents = n;
    r->sring = sring;
    r->ent_size = ent_size;
    r->req_size = req_size;
    r->rsp_size = rsp_size;
    return 0;
}

int pvio_front_init(struct pvio_front_ring *r, void *sring, size_t bytes,
                    uint32_t ent_size, uint32_t req_size, uint32_t rsp_size)
{
    int err = pvio_front_attach(r, sring, bytes, ent_size, req_size, rsp_size, 0);
    if (err)
        return err;
    struct pvio_sring *s = r->sring;
    /* SHARED_RING_INIT */
    s->req_prod = 0;
    s->rsp_prod = 0;
    s->req_event = 1;
    s->rsp_event = 1;
    memset(s->pvt, 0, sizeof s->pvt);
    memset(s->pad, 0, sizeof s->pad);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return 0;
}

int pvio_back_attach(struct pvio_back_ring *r, void *sring, size_t bytes,
                     uint32_t ent_size, uint32_t req_size, uint32_t rsp_size, RING_IDX idx)
{
    unsigned int n;
    int err = check_sizes(sring, bytes, ent_size, req_size, rsp_size, &n);
    if (err)
        return err;
    r->rsp_prod_pvt = idx;
    r->req_cons = idx;
    r->nr_ents = n;
    r->sring = sring;
    r->ent_size = ent_size;
    r->req_size = req_size;
    r->rsp_size = rsp_size;
    return 0;
}

/* ------------------------------------------------------------------ frontend */

unsigned int pvio_front_free_requests(const struct pvio_front_ring *r)
{
    return r->nr_ents - (r->req_prod_pvt - r->rsp_cons);
}

int pvio_front_put_requests(struct pvio_front_ring *r, const char *src, unsigned int n)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    if (n > pvio_front_free_requests(r))
        return PVIO_RING_EINVAL;
    for (unsigned int i = 0; i < n; i++) {
        memcpy(slot(r->sring, r->nr_ents, r->ent_size, r->req_prod_pvt), src, r->req_size);
        src += r->req_size;
        r->req_prod_pvt++;
    }
    return (int)n;
}

/* (old, new] contains the peer's event index: the notify test of ring.h. */
static inline int event_in_window(RING_IDX old, RING_IDX new, RING_IDX event)
{
    return (RING_IDX)(new - event) < (RING_IDX)(new - old);
}

int pvio_front_push_requests(struct pvio_front_ring *r)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    struct pvio_sring *s = r->sring;
    RING_IDX old = __atomic_load_n(&s->req_prod, __ATOMIC_RELAXED);
    RING_IDX new = r->req_prod_pvt;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* back sees requests before the new producer index */
    store_own(&s->req_prod, new);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* back sees the new index before we check req_event */
    return event_in_window(old, new, __atomic_load_n(&s->req_event, __ATOMIC_RELAXED));
}

int pvio_front_send(struct pvio_front_ring *r, const char *src, unsigned int n, int *notify)
{
    if (r->sring == NULL) {
        *notify = 0;
        return PVIO_RING_ERELEASED;
    }
    unsigned int free = pvio_front_free_requests(r);
    if (n > free)
        n = free;
    pvio_front_put_requests(r, src, n);
    *notify = n ? pvio_front_push_requests(r) : 0;
    return (int)n;
}

/*
 * Responses the backend has published and we have not consumed.  rsp_prod is
 * the backend's to write, so it is hostile: it may neither run past the
 * requests we have issued (RING_RESPONSE_PROD_OVERFLOW, made exact) nor move
 * behind what we already consumed.  Both show as a difference larger than the
 * number of outstanding requests, since the subtraction is modulo 2^32.
 */
static int front_unconsumed(const struct pvio_front_ring *r, RING_IDX rsp_prod)
{
    RING_IDX avail = rsp_prod - r->rsp_cons;
    RING_IDX outstanding = r->req_prod_pvt - r->rsp_cons;
    if (avail > outstanding || avail > r->nr_ents)
        return PVIO_RING_EOVERFLOW;
    return (int)avail;
}

int pvio_front_unconsumed_responses(const struct pvio_front_ring *r)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    return front_unconsumed(r, load_peer(&r->sring->rsp_prod));
}

int pvio_front_take_responses(struct pvio_front_ring *r, char *dst, unsigned int max)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    int avail = front_unconsumed(r, load_peer(&r->sring->rsp_prod)); /* read once, then rmb */
    if (avail < 0)
        return avail;
    unsigned int n = (unsigned int)avail < max ? (unsigned int)avail : max;
    for (unsigned int i = 0; i < n; i++) {
        memcpy(dst, slot(r->sring, r->nr_ents, r->ent_size, r->rsp_cons), r->rsp_size);
        dst += r->rsp_size;
        r->rsp_cons++;
    }
    return (int)n;
}

int pvio_front_final_check_for_responses(struct pvio_front_ring *r, unsigned int ahead)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    int n = pvio_front_unconsumed_responses(r);
    if (n != 0)
        return n;
    store_own(&r->sring->rsp_event, r->rsp_cons + (ahead ? ahead : 1));
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* back sees rsp_event before we re-read rsp_prod */
    return pvio_front_unconsumed_responses(r);
}

/* ------------------------------------------------------------------- backend */

/*
 * Requests the frontend has published and we may consume: the ring.h count,
 * capped by the response slots still free.  req_prod is hostile: more than a
 * ring's worth ahead of our responses (RING_REQUEST_PROD_OVERFLOW) or behind
 * what we already consumed is impossible, and reported as such.
 */
static int back_unconsumed(const struct pvio_back_ring *r, RING_IDX req_prod)
{
    RING_IDX avail = req_prod - r->rsp_prod_pvt;
    RING_IDX taken = r->req_cons - r->rsp_prod_pvt;
    if (avail > r->nr_ents || avail < taken)
        return PVIO_RING_EOVERFLOW;
    return (int)(avail - taken);
}

int pvio_back_unconsumed_requests(const struct pvio_back_ring *r)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    return back_unconsumed(r, load_peer(&r->sring->req_prod));
}

int pvio_back_take_requests(struct pvio_back_ring *r, char *dst, unsigned int max)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    int avail = back_unconsumed(r, load_peer(&r->sring->req_prod)); /* read once, then rmb */
    if (avail < 0)
        return avail;
    unsigned int n = (unsigned int)avail < max ? (unsigned int)avail : max;
    for (unsigned int i = 0; i < n; i++) {
        memcpy(dst, slot(r->sring, r->nr_ents, r->ent_size, r->req_cons), r->req_size);
        dst += r->req_size;
        r->req_cons++;
    }
    return (int)n;
}

int pvio_back_put_responses(struct pvio_back_ring *r, const char *src, unsigned int n)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    if (n > (RING_IDX)(r->req_cons - r->rsp_prod_pvt))
        return PVIO_RING_EINVAL; /* more responses than requests taken */
    for (unsigned int i = 0; i < n; i++) {
        memcpy(slot(r->sring, r->nr_ents, r->ent_size, r->rsp_prod_pvt), src, r->rsp_size);
        src += r->rsp_size;
        r->rsp_prod_pvt++;
    }
    return (int)n;
}

int pvio_back_push_responses(struct pvio_back_ring *r)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    struct pvio_sring *s = r->sring;
    RING_IDX old = __atomic_load_n(&s->rsp_prod, __ATOMIC_RELAXED);
    RING_IDX new = r->rsp_prod_pvt;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* front sees responses (and our reads are done) first */
    store_own(&s->rsp_prod, new);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* front sees the new index before we check rsp_event */
    return event_in_window(old, new, __atomic_load_n(&s->rsp_event, __ATOMIC_RELAXED));
}

int pvio_back_send(struct pvio_back_ring *r, const char *src, unsigned int n, int *notify)
{
    int put = pvio_back_put_responses(r, src, n);
    if (put < 0) {
        *notify = 0;
        return put;
    }
    *notify = put ? pvio_back_push_responses(r) : 0;
    return put;
}

int pvio_back_final_check_for_requests(struct pvio_back_ring *r, unsigned int ahead)
{
    if (r->sring == NULL)
        return PVIO_RING_ERELEASED;
    int n = pvio_back_unconsumed_requests(r);
    if (n != 0)
        return n;
    store_own(&r->sring->req_event, r->req_cons + (ahead ? ahead : 1));
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* front sees req_event before we re-read req_prod */
    return pvio_back_unconsumed_requests(r);
}

/* ---------------------------------------------------------------- measurement */

long long pvio_ring_round_trips(struct pvio_front_ring *front, struct pvio_back_ring *back,
                                const char *reqs, const char *rsps, unsigned int n,
                                unsigned long long loops, char *scratch)
{
    int notify;
    for (unsigned long long i = 0; i < loops; i++) {
        int rc = pvio_front_send(front, reqs, n, &notify);
        if (rc == (int)n)
            rc = pvio_back_take_requests(back, scratch, n);
        if (rc == (int)n)
            rc = pvio_back_send(back, rsps, n, &notify);
        if (rc == (int)n)
            rc = pvio_front_take_responses(front, scratch, n);
        if (rc != (int)n)
            return rc < 0 ? rc : PVIO_RING_EINVAL;
    }
    return (long long)(2ull * n * loops);
}
