/*
 * Both ends of the netif TX and RX rings, written with nothing but Xen's own public headers
 * (io/ring.h and io/netif.h from libxen-dev), as a netfront or netback in C would be.
 *
 * Built as a shared library by tests/test_xen_headers.py and driven through cffi's ABI mode
 * against pvio.ringbuf on the same page: every ring operation here is a ring.h macro, so any
 * difference in layout, index arithmetic or notification hold-off between pvio and Xen shows
 * up as a difference in the pages or in a notify decision.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Barriers for ring.h (a single process: a full compiler and CPU barrier is enough). */
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()

#include <xen/io/netif.h>

#define PAGE 4096
/* As Linux's netfront defines them: slots in one page, from ring.h's own macro. */
#define NET_TX_RING_SIZE __CONST_RING_SIZE(netif_tx, PAGE)
#define NET_RX_RING_SIZE __CONST_RING_SIZE(netif_rx, PAGE)

/* One front and one back ring per protocol; each end is attached to a page by the test. */
#define ENDS(tag, req_t, rsp_t)                                                              \
    static struct tag##_front_ring tag##_front;                                               \
    static struct tag##_back_ring tag##_back;                                                 \
                                                                                              \
    /* SHARED_RING_INIT, then every index at `start` (a live ring's state near a wrap). */   \
    void tag##_shared_init(void *page, uint32_t start)                                        \
    {                                                                                         \
        struct tag##_sring *s = page;                                                         \
        SHARED_RING_INIT(s);                                                                  \
        s->req_prod = s->rsp_prod = start;                                                    \
        s->req_event = s->rsp_event = start + 1;                                              \
    }                                                                                         \
    void tag##_front_attach(void *page, uint32_t start)                                       \
    {                                                                                         \
        FRONT_RING_ATTACH(&tag##_front, (struct tag##_sring *)page, start, PAGE);             \
    }                                                                                         \
    void tag##_back_attach(void *page, uint32_t start)                                        \
    {                                                                                         \
        BACK_RING_ATTACH(&tag##_back, (struct tag##_sring *)page, start, PAGE);               \
    }                                                                                         \
    int tag##_front_free(void) { return RING_FREE_REQUESTS(&tag##_front); }                   \
    int tag##_front_put(const req_t *reqs, int n)                                             \
    {                                                                                         \
        int i;                                                                                \
        if (n > (int)RING_FREE_REQUESTS(&tag##_front))                                        \
            return -1;                                                                        \
        for (i = 0; i < n; i++)                                                               \
            *RING_GET_REQUEST(&tag##_front, tag##_front.req_prod_pvt++) = reqs[i];            \
        return n;                                                                             \
    }                                                                                         \
    int tag##_front_push(void)                                                                \
    {                                                                                         \
        int notify;                                                                           \
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&tag##_front, notify);                            \
        return notify;                                                                        \
    }                                                                                         \
    int tag##_front_take(rsp_t *out, int max)                                                 \
    {                                                                                         \
        int n = 0;                                                                            \
        while (n < max && RING_HAS_UNCONSUMED_RESPONSES(&tag##_front)) {                      \
            RING_COPY_RESPONSE(&tag##_front, tag##_front.rsp_cons, &out[n]);                  \
            tag##_front.rsp_cons++;                                                           \
            n++;                                                                              \
        }                                                                                     \
        return n;                                                                             \
    }                                                                                         \
    int tag##_front_final_check(void)                                                         \
    {                                                                                         \
        int work;                                                                             \
        RING_FINAL_CHECK_FOR_RESPONSES(&tag##_front, work);                                   \
        return work;                                                                          \
    }                                                                                         \
    int tag##_back_take(req_t *out, int max)                                                  \
    {                                                                                         \
        int n = 0;                                                                            \
        while (n < max && RING_HAS_UNCONSUMED_REQUESTS(&tag##_back)) {                        \
            RING_COPY_REQUEST(&tag##_back, tag##_back.req_cons, &out[n]);                     \
            tag##_back.req_cons++;                                                            \
            n++;                                                                              \
        }                                                                                     \
        return n;                                                                             \
    }                                                                                         \
    int tag##_back_put(const rsp_t *rsps, int n)                                              \
    {                                                                                         \
        int i;                                                                                \
        if ((int)(tag##_back.req_cons - tag##_back.rsp_prod_pvt) < n)                         \
            return -1;                                                                        \
        for (i = 0; i < n; i++)                                                               \
            *RING_GET_RESPONSE(&tag##_back, tag##_back.rsp_prod_pvt++) = rsps[i];             \
        return n;                                                                             \
    }                                                                                         \
    int tag##_back_push(void)                                                                 \
    {                                                                                         \
        int notify;                                                                           \
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&tag##_back, notify);                            \
        return notify;                                                                        \
    }                                                                                         \
    int tag##_back_final_check(void)                                                          \
    {                                                                                         \
        int work;                                                                             \
        RING_FINAL_CHECK_FOR_REQUESTS(&tag##_back, work);                                     \
        return work;                                                                          \
    }

ENDS(netif_tx, netif_tx_request_t, netif_tx_response_t)
ENDS(netif_rx, netif_rx_request_t, netif_rx_response_t)

/* Xen's constants and layout numbers, by name, for the test to compare with pvio's. */
struct xh_const {
    const char *name;
    long value;
};

#define C(x) {#x, (long)(x)}
static const struct xh_const consts[] = {
    C(sizeof(struct netif_tx_request)),
    C(sizeof(struct netif_tx_response)),
    C(sizeof(struct netif_rx_request)),
    C(sizeof(struct netif_rx_response)),
    C(sizeof(union netif_tx_sring_entry)),
    C(sizeof(union netif_rx_sring_entry)),
    C(offsetof(struct netif_tx_sring, ring)),
    C(offsetof(struct netif_rx_sring, ring)),
    C(offsetof(struct netif_tx_sring, req_prod)),
    C(offsetof(struct netif_tx_sring, req_event)),
    C(offsetof(struct netif_tx_sring, rsp_prod)),
    C(offsetof(struct netif_tx_sring, rsp_event)),
    C(offsetof(struct netif_tx_request, gref)),
    C(offsetof(struct netif_tx_request, offset)),
    C(offsetof(struct netif_tx_request, flags)),
    C(offsetof(struct netif_tx_request, id)),
    C(offsetof(struct netif_tx_request, size)),
    C(offsetof(struct netif_tx_response, id)),
    C(offsetof(struct netif_tx_response, status)),
    C(offsetof(struct netif_rx_request, id)),
    C(offsetof(struct netif_rx_request, gref)),
    C(offsetof(struct netif_rx_response, id)),
    C(offsetof(struct netif_rx_response, offset)),
    C(offsetof(struct netif_rx_response, flags)),
    C(offsetof(struct netif_rx_response, status)),
    C(NET_TX_RING_SIZE),
    C(NET_RX_RING_SIZE),
    C(NETTXF_csum_blank),
    C(NETTXF_data_validated),
    C(NETTXF_more_data),
    C(NETTXF_extra_info),
    C(NETRXF_data_validated),
    C(NETRXF_csum_blank),
    C(NETRXF_more_data),
    C(NETRXF_extra_info),
    C(NETRXF_gso_prefix),
    C(NETIF_RSP_DROPPED),
    C(NETIF_RSP_ERROR),
    C(NETIF_RSP_OKAY),
    C(NETIF_RSP_NULL),
    C(XEN_NETIF_NR_SLOTS_MIN),
    C(XEN_NETIF_MAX_TX_SIZE),
    C(XEN_NETIF_EXTRA_TYPE_NONE),
    C(XEN_NETIF_EXTRA_TYPE_GSO),
    C(XEN_NETIF_EXTRA_TYPE_MCAST_ADD),
    C(XEN_NETIF_EXTRA_TYPE_MCAST_DEL),
    C(XEN_NETIF_EXTRA_TYPE_HASH),
    C(XEN_NETIF_EXTRA_FLAG_MORE),
};

int xh_nconsts(void) { return (int)(sizeof(consts) / sizeof(consts[0])); }
const char *xh_const_name(int i) { return consts[i].name; }
long xh_const_value(int i) { return consts[i].value; }
