/*
 * pvio shared-memory ring: binary-compatible with Xen's public io/ring.h.
 *
 * One shared page (or any caller-supplied region) holds a 64-byte header and a
 * power-of-two array of slots.  The frontend produces requests and consumes
 * responses; the backend does the opposite.  Indices are free-running u32
 * counters that wrap modulo 2^32; a slot is `idx & (nr_ents - 1)`.
 *
 * Unlike ring.h, which is a set of macros instantiated per entry type, this is
 * one generic implementation parameterised by the request, response and slot
 * sizes, so Python (through cffi) can drive any protocol's ring with the same
 * code.  Every operation that moves entries does so in batches: one call
 * copies N entries in or out, so a Python caller pays one crossing per batch.
 *
 * Hostile peers: every entry is copied out of the shared page exactly once
 * (XSA-155, RING_COPY_REQUEST/RING_COPY_RESPONSE); each index the peer
 * controls is read once per operation and checked against the ring size
 * before use (RING_REQUEST_PROD_OVERFLOW / RING_RESPONSE_PROD_OVERFLOW), so a
 * peer that moves its producer index far ahead makes the operation fail with
 * PVIO_RING_EOVERFLOW instead of reading past the ring.
 *
 * The text between the cffi markers below is read verbatim by the cffi build
 * script (_build.py) as its cdef, so every layout is declared in this one
 * place: plain declarations only there, no macros with expressions.
 */
#ifndef PVIO_RING_H
#define PVIO_RING_H

#include <stddef.h>
#include <stdint.h>

/* cffi-cdef-begin */

typedef uint32_t RING_IDX;

/* Error results (negative) of the ring operations. */
enum pvio_ring_error {
    PVIO_RING_EOVERFLOW = -1, /* the peer's producer index is impossible */
    PVIO_RING_EINVAL = -2,    /* API misuse: bad sizes, too many entries */
    PVIO_RING_ERELEASED = -3  /* the ring end let go of its memory (sring is NULL) */
};

/* The 64-byte shared header, exactly as DEFINE_RING_TYPES lays it out. */
struct pvio_sring {
    RING_IDX req_prod;   /* written by the frontend: requests published up to here */
    RING_IDX req_event;  /* written by the backend: notify me when req_prod passes this */
    RING_IDX rsp_prod;   /* written by the backend: responses published up to here */
    RING_IDX rsp_event;  /* written by the frontend: notify me when rsp_prod passes this */
    uint8_t pvt[4];      /* protocol-private (netif: smartpoll_active) */
    uint8_t pad[44];     /* zero */
    /* followed by nr_ents slots of `ent_size` bytes each */
};

/*
 * Private (non-shared) state.  The first four fields are struct
 * <name>_front_ring / <name>_back_ring of ring.h in order; pvio appends the
 * entry sizes, since one implementation serves every layout.
 */
struct pvio_front_ring {
    RING_IDX req_prod_pvt;     /* requests written but perhaps not yet published */
    RING_IDX rsp_cons;         /* responses consumed */
    unsigned int nr_ents;      /* RING_SIZE: a power of two */
    struct pvio_sring *sring;  /* the shared header */
    uint32_t ent_size;         /* bytes per slot: max(req, rsp) rounded to alignment */
    uint32_t req_size;         /* bytes of a request written into a slot */
    uint32_t rsp_size;         /* bytes of a response copied out of a slot */
};

struct pvio_back_ring {
    RING_IDX rsp_prod_pvt;     /* responses written but perhaps not yet published */
    RING_IDX req_cons;         /* requests consumed */
    unsigned int nr_ents;
    struct pvio_sring *sring;
    uint32_t ent_size;
    uint32_t req_size;
    uint32_t rsp_size;
};

/* io/netif.h wire structures (all sizes equal on i386 and x86_64). */
struct netif_tx_request {
    uint32_t gref;     /* grant reference of the page holding this slot's data */
    uint16_t offset;   /* offset of the data within that page */
    uint16_t flags;    /* NETTXF_* */
    uint16_t id;       /* echoed in the response */
    uint16_t size;     /* first slot: total packet size; later slots: this fragment */
};

struct netif_tx_response {
    uint16_t id;
    int16_t status;    /* NETIF_RSP_* */
};

struct netif_rx_request {
    uint16_t id;
    uint16_t pad;
    uint32_t gref;     /* grant reference of the posted receive buffer */
};

struct netif_rx_response {
    uint16_t id;
    uint16_t offset;   /* offset of the data within the buffer page */
    uint16_t flags;    /* NETRXF_* */
    int16_t status;    /* > 0: bytes in this fragment; < 0: NETIF_RSP_* */
};

struct netif_extra_info {
    uint8_t type;      /* XEN_NETIF_EXTRA_TYPE_* */
    uint8_t flags;     /* XEN_NETIF_EXTRA_FLAG_* */
    uint8_t u[6];      /* gso / mcast / hash variants */
};

/* The slot unions: their sizes are the ring's entry sizes. */
union netif_tx_sring_entry {
    struct netif_tx_request req;
    struct netif_tx_response rsp;
};

union netif_rx_sring_entry {
    struct netif_rx_request req;
    struct netif_rx_response rsp;
};

/* Number of slots that fit in `bytes` of ring memory, rounded down to a power of two. */
unsigned int pvio_ring_nr_ents(size_t bytes, size_t ent_size);

/* SHARED_RING_INIT + FRONT_RING_INIT: only the frontend initialises the shared page. */
int pvio_front_init(struct pvio_front_ring *r, void *sring, size_t bytes,
                    uint32_t ent_size, uint32_t req_size, uint32_t rsp_size);
/* FRONT_RING_ATTACH: reconnect to a live ring with both private indices at idx. */
int pvio_front_attach(struct pvio_front_ring *r, void *sring, size_t bytes,
                      uint32_t ent_size, uint32_t req_size, uint32_t rsp_size, RING_IDX idx);
/* BACK_RING_INIT (idx 0) / BACK_RING_ATTACH. Neither touches the shared page. */
int pvio_back_attach(struct pvio_back_ring *r, void *sring, size_t bytes,
                     uint32_t ent_size, uint32_t req_size, uint32_t rsp_size, RING_IDX idx);

/* ---- frontend ---- */
/* RING_FREE_REQUESTS. */
unsigned int pvio_front_free_requests(const struct pvio_front_ring *r);
/* Write n packed requests (req_size bytes each) into free slots; not yet published. */
int pvio_front_put_requests(struct pvio_front_ring *r, const char *src, unsigned int n);
/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; 1 if the backend asked to be notified. */
int pvio_front_push_requests(struct pvio_front_ring *r);
/* put + push in one call: writes min(n, free) requests; returns that count, *notify set. */
int pvio_front_send(struct pvio_front_ring *r, const char *src, unsigned int n, int *notify);
/* RING_HAS_UNCONSUMED_RESPONSES, or PVIO_RING_EOVERFLOW for an impossible rsp_prod. */
int pvio_front_unconsumed_responses(const struct pvio_front_ring *r);
/* Copy up to max responses out of the ring once each (RING_COPY_RESPONSE) into dst. */
int pvio_front_take_responses(struct pvio_front_ring *r, char *dst, unsigned int max);
/* RING_FINAL_CHECK_FOR_RESPONSES with rsp_event = rsp_cons + ahead (1 = ring.h's). */
int pvio_front_final_check_for_responses(struct pvio_front_ring *r, unsigned int ahead);

/* ---- backend ---- */
/* RING_HAS_UNCONSUMED_REQUESTS (capped by free response space), or PVIO_RING_EOVERFLOW. */
int pvio_back_unconsumed_requests(const struct pvio_back_ring *r);
/* Copy up to max requests out of the ring once each (RING_COPY_REQUEST) into dst. */
int pvio_back_take_requests(struct pvio_back_ring *r, char *dst, unsigned int max);
/* Write n packed responses into the slots of requests already taken; not yet published. */
int pvio_back_put_responses(struct pvio_back_ring *r, const char *src, unsigned int n);
/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY. */
int pvio_back_push_responses(struct pvio_back_ring *r);
/* put + push in one call; returns the count written (all n, or PVIO_RING_EINVAL). */
int pvio_back_send(struct pvio_back_ring *r, const char *src, unsigned int n, int *notify);
/* RING_FINAL_CHECK_FOR_REQUESTS with req_event = req_cons + ahead. */
int pvio_back_final_check_for_requests(struct pvio_back_ring *r, unsigned int ahead);

/* ---- measurement ---- */
/*
 * The C ring's own rate for the benchmark's loop, measured in the same run as the Python API:
 * `loops` times, the front sends n requests (from reqs), the back takes them (into scratch),
 * sends n responses (from rsps) and the front takes them (into scratch): the same four calls
 * a Python caller makes per batch.  Returns the entries moved (2 * n * loops), or a negative
 * PVIO_RING_* error if any call moved fewer than n (a ring that is not empty to start with).
 */
long long pvio_ring_round_trips(struct pvio_front_ring *front, struct pvio_back_ring *back,
                                const char *reqs, const char *rsps, unsigned int n,
                                unsigned long long loops, char *scratch);

/* cffi-cdef-end */

#endif /* PVIO_RING_H */
