/*
 * pvio native data path: the per-packet work of netback and the switch, in C, behind
 * batch calls (Python orchestrates the batches; pvio/core/netpath.py wraps these).
 *
 * Every call takes a whole batch: the TX requests one ring drain produced, the frames one
 * switch input carries, the RX requests and queued frames one delivery moves.  Nothing
 * here touches a ring index or makes a hypercall: the Python side takes the requests out
 * of the shared ring (each copied once, by ring.c), runs the grant-copy hypercall the plan
 * built (so every exit, hypercall and copy is counted where it always was) and pushes the
 * responses.  The readable reference of every function is the Python of backends/netback.py
 * and backends/switch.py (PVIO_DATAPATH=python); tests/test_netpath_differential.py holds
 * the two equal on random and hostile input.
 *
 * Frames live in *areas*: a set of dom0 pages seen as one byte space (position p is byte
 * p & 4095 of page (p >> 12) % npages).  A frame of up to a page never crosses a page; a
 * longer one starts on a page and takes consecutive pages, so every chunk a grant copy
 * moves is inside one page.  TX grant-copies into the vif's TX area (reset every batch);
 * the receiving vif copies each frame it queues into its own RX area (a bounded FIFO,
 * XSA-392), from which RX grant-copies into the guest's buffers.
 *
 * Layouts: struct gnttab_copy and the netif constants come from netpath_abi.h, generated
 * at build time from pvio.abi and ringbuf/netif.py (pvio/core/_native_build.py); the
 * netif request and response structs from ringbuf/ring.h.
 *
 * The text between the markers is the cffi cdef.
 */
#ifndef PVIO_NETPATH_H
#define PVIO_NETPATH_H

#include <stdint.h>

/* cffi-cdef-begin */

/* Drop reasons (the counters' drops.<name>; names in pvio/core/netpath.py). */
enum {
    NP_OK = 0,
    NP_TOO_MANY_SLOTS = 1,
    NP_BAD_OFFSET = 2,
    NP_BAD_SIZE = 3,
    NP_BAD_GRANT = 4,
};

/* Fatal protocol errors that disable a vif. */
enum {
    NP_FATAL_NONE = 0,
    NP_FATAL_ID = 1,          /* a request id outside the ring (arg: the id) */
    NP_FATAL_SLOTS = 2,       /* a packet of more than fatal_slots slots */
    NP_FATAL_INTERNAL = 3,    /* the plan did not fit (a bug, never a guest's doing) */
};

/* Switch decisions per frame (>= 0: an egress port index). */
enum {
    NP_SW_FLOOD = -1,
    NP_SW_RUNT = -2,
    NP_SW_OVERSIZE = -3,
    NP_SW_SAME_PORT = -4,
    NP_SW_SPOOFED = -5,
    NP_SW_NO_EGRESS = -6,
};

/* Dom0 pages seen as one byte space; head: next allocation, tail: the oldest live byte. */
struct np_area {
    uint8_t *mem;            /* dom0's RAM */
    const uint64_t *gfn;     /* the area's pages */
    uint32_t npages;
    uint32_t pad;
    uint64_t head;
    uint64_t tail;
};

/* One frame in an area. */
struct np_frame {
    uint64_t pos;
    uint32_t len;
    uint32_t pad;
};

/* One packet of a TX batch, as the plan found it. */
struct np_tx_pkt {
    uint32_t first;          /* index of its first request in the batch */
    uint16_t nslots;         /* data slots */
    uint16_t extras;         /* extra-info slots (answered NULL) */
    int32_t reason;          /* NP_OK or a drop reason */
    int32_t bad_status;      /* the first failed grant copy's GNTST status (NP_BAD_GRANT) */
    uint32_t op;             /* its first grant-copy op */
    uint32_t nops;
    uint64_t pos;            /* where the frame lands in the TX area */
    uint32_t len;
    uint32_t csum;           /* NETTXF_csum_blank: the backend completes the checksum */
};

struct np_tx_plan {
    uint32_t npkts;
    uint32_t consumed;       /* requests used by whole packets (the rest is carried) */
    uint32_t nops;
    uint32_t fatal;          /* NP_FATAL_* */
    uint32_t fatal_arg;
    uint32_t nbad;           /* packets that failed validation */
};

struct np_tx_done {
    uint32_t nrsp;           /* responses written */
    uint32_t nframes;        /* frames produced */
    uint64_t bytes;          /* their bytes */
    uint32_t drops[8];       /* by NP_* reason */
    uint32_t checksums;      /* checksums completed */
};

/* A vif's RX queue: frames in its area, oldest first (a ring of descriptors). */
struct np_rxq {
    struct np_area area;
    struct np_frame *q;
    uint32_t qcap;           /* descriptors allocated */
    uint32_t qhead;          /* index of the oldest */
    uint32_t qlen;
    uint32_t pad;
};

struct np_rx_done {
    uint32_t nrsp;
    uint32_t delivered;
    uint64_t delivered_bytes;
    uint32_t bad_grant;      /* frames whose copy into the guest failed */
    uint32_t pad;
};

struct np_enq_done {
    uint32_t queued;
    uint32_t dropped;
    uint64_t copies;         /* frame copies made (chunks) */
    uint64_t copy_bytes;
};

/* The switch's MAC table as the C decision sees it (open addressing, rebuilt when it changes). */
struct np_mac_table {
    uint64_t *key;           /* MAC in the low 48 bits, bit 63 set: slot used */
    int32_t *port;           /* port index */
    uint32_t mask;           /* slots - 1 (a power of two) */
    uint32_t pad;
};

struct np_sw_done {
    uint32_t forwarded, flooded, runt, oversize, same_port, no_egress, spoofed;
    uint32_t norder;         /* egress ports used, in first-use order (order[]) */
    uint64_t in_bytes;
};

/* Place a frame of len bytes at the area's head: its position, or -1 when check_room is set
 * and the area has no room between tail and head (nothing changes then). */
int64_t pvio_np_place(struct np_area *a, uint32_t len, int check_room);

/* TX: group `n` 12-byte netif_tx_requests into packets, validate them (netback's rules),
 * place each good one in `area` and write its grant-copy ops (source: the frontend's grants)
 * into `ops` (room for max_ops). */
int pvio_np_tx_plan(const uint8_t *reqs, uint32_t n, uint32_t nr_ents, uint32_t fatal_slots,
                    uint16_t fe_domid, struct np_area *area, uint8_t *ops, uint32_t max_ops,
                    struct np_tx_pkt *pkts, struct np_tx_plan *out);

/* TX, after the grant copy ran: statuses -> drops, checksums completed in place, frames,
 * and the 4-byte netif_tx_responses of every request the packets used, in ring order. */
int pvio_np_tx_finish(const uint8_t *reqs, const uint8_t *ops, struct np_tx_pkt *pkts, uint32_t npkts,
                      struct np_area *area, uint8_t *rsp, struct np_frame *frames, struct np_tx_done *out);

/* RX queue: copy frames (idx[0..n) of `frames` in `src`, or all when idx is NULL) to the queue's
 * tail, at most `max` frames queued; a frame that does not fit, and every later one, is dropped. */
int pvio_np_rx_enqueue(struct np_rxq *q, const struct np_area *src, const struct np_frame *frames,
                       const uint32_t *idx, uint32_t n, uint32_t max, struct np_enq_done *out);

/* RX: how many queued frames `avail` posted buffers take (at most max_frames); *need: their slots. */
uint32_t pvio_np_rx_plan(const struct np_rxq *q, uint32_t avail, uint32_t max_frames, uint32_t *need);

/* RX: grant-copy ops (dest: the guest's buffers, rx requests `reqs`) for the first `nframes`. */
uint32_t pvio_np_rx_build(const struct np_rxq *q, uint32_t nframes, const uint8_t *reqs, uint16_t fe_domid,
                          uint8_t *ops);

/* RX, after the grant copy ran: the 8-byte netif_rx_responses, counts; the frames leave the queue. */
int pvio_np_rx_finish(struct np_rxq *q, uint32_t nframes, const uint8_t *reqs, const uint8_t *ops,
                      uint8_t *rsp, struct np_rx_done *out);

/* Fill q (an empty queue over src's pages) with the descriptors of frames idx[0..n): RX straight
 * from a switch batch, without a copy into the receiver's queue. */
int pvio_np_rx_load(struct np_rxq *q, const struct np_area *src, const struct np_frame *frames,
                    const uint32_t *idx, uint32_t n);

/* Copy frames idx[0..n) (all when idx is NULL) of an area into `out`, back to back. */
uint64_t pvio_np_gather(const struct np_area *a, const struct np_frame *frames, const uint32_t *idx,
                        uint32_t n, uint8_t *out);

/* Where frames idx[0..n) (all when idx is NULL) lie in dom0's RAM: [start[k], end[k]) as offsets
 * from a->mem.  -1 (nothing written past the frame before) if one is longer than a page (it lies
 * in several): the caller copies those its own way. */
int pvio_np_spans(const struct np_area *a, const struct np_frame *frames, const uint32_t *idx, uint32_t n,
                  uint64_t *start, uint64_t *end);

/* Switch: the forwarding decision for a batch from port `in_port`, whose only source MACs are
 * locked[0..nlocked) (a locked port: it learns nothing).  dest[i] per frame; idx[p * n ..]
 * the frames for port p (flooded ones to every other port), counts[p] how many, bytes_to[p]
 * their bytes, flooded_to[p] how many by flooding, order[] the ports in first-use order. */
int pvio_np_switch(const struct np_area *a, const struct np_frame *frames, uint32_t n,
                   const struct np_mac_table *t, uint32_t in_port, uint32_t nports,
                   const uint64_t *locked, uint32_t nlocked, int32_t *dest, uint32_t *idx,
                   uint32_t *counts, uint64_t *bytes_to, uint32_t *flooded_to, uint32_t *order,
                   struct np_sw_done *out);

/* ------------------------------------------------------------------ netfront (the guest's half) */

/* Kinds of the RX slot records pvio_nf_rx writes. */
enum {
    NF_FRAME = 0,      /* a whole frame in one slot */
    NF_PART = 1,       /* a slot of a frame that goes on (NETRXF_more_data) */
    NF_LAST = 2,       /* the last slot of a frame of several */
    NF_STATUS = 3,     /* an error status (len holds it): the frame being built is dropped */
};

/* Why netfront's RX reaping stopped (the device fails). */
enum {
    NF_ERR_NONE = 0,
    NF_ERR_ID = 1,         /* arg: the id, not a posted buffer */
    NF_ERR_EMPTY = 2,      /* a response of 0 bytes */
    NF_ERR_CROSS = 3,      /* arg: offset, arg2: size: crosses the page */
    NF_ERR_SLOTS = 4,      /* a packet of more than RX_PACKET_MAX_SLOTS slots */
};

struct nf_rx_done {
    uint32_t nrec;         /* slot records written */
    uint32_t nrepost;      /* buffer ids to re-post (every response with a valid id) */
    uint32_t error;        /* NF_ERR_* */
    uint32_t arg, arg2;
    uint32_t parts;        /* slots of the frame still being built when the batch ended */
};

/* Reap `n` 8-byte netif_rx_responses: range-check each id against the posted buffers (posted[id]
 * is cleared: a second response for one buffer is a lie), check the slot, and describe every
 * data slot as a record (rid, offset, len, kind); `parts` is how many slots of an unfinished
 * frame the previous batch left; rec_start/rec_end: where a data slot's bytes lie in guest memory
 * (base[id]: the buffer's address).  Stops at the first protocol error. */
int pvio_nf_rx(const uint8_t *rsp, uint32_t n, uint32_t nr_ents, uint8_t *posted, uint32_t parts,
               uint32_t max_slots, uint16_t *rec_id, uint16_t *rec_off, int32_t *rec_len, uint8_t *rec_kind,
               uint16_t *repost, const uint64_t *base, uint64_t *rec_start, uint64_t *rec_end,
               struct nf_rx_done *out);

struct nf_tx_done {
    uint32_t nfree;        /* ids freed (in free[]) */
    uint32_t nerr;         /* error statuses (in errs[]) */
    uint32_t bad;          /* 1: a response id that is not outstanding (arg) */
    uint32_t arg;
};

/* Reap `n` 4-byte netif_tx_responses: NULL ones skipped, each other id must be outstanding. */
int pvio_nf_tx_reap(const uint8_t *rsp, uint32_t n, uint32_t nr_ents, uint8_t *outstanding, uint16_t *free_ids,
                    int16_t *errs, struct nf_tx_done *out);

/* The 12-byte netif_tx_requests of n one-slot frames: slot sids[k] (grant refs[sids[k]]) holds
 * lens[k] bytes at offset 0; each slot becomes outstanding; start/end: where each frame goes in
 * guest memory (base[sid]: the slot's page address). */
int pvio_nf_tx_reqs(const uint16_t *sids, const uint32_t *lens, uint32_t n, const uint32_t *refs,
                    uint8_t *outstanding, uint8_t *reqs, const uint64_t *base, uint64_t *start, uint64_t *end);

/* The RX requests that give buffers ids[0..n) back to the backend (buffer id i is granted as refs[i]):
 * each becomes posted again.  -1 (posted[] unchanged) if an id is outside the ring or still posted:
 * a buffer is re-posted at most once per answer. */
int pvio_nf_rx_repost(const uint16_t *ids, uint32_t n, uint32_t nr_ents, uint8_t *posted, const uint32_t *refs,
                      uint8_t *reqs);

/* cffi-cdef-end */

#endif
