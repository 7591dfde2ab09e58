/* The per-packet work of netback and the switch in C: see netpath.h. */
#include "netpath.h"

#include <string.h>

#include "netpath_abi.h" /* generated: struct gnttab_copy and the netif constants */
#include "ring.h"        /* struct netif_tx_request and the other netif wire structs */

#define NP_PAGE 4096u
#define NP_MAX_FRAME (65535u + 14u)

_Static_assert(sizeof(struct gnttab_copy) == 40, "gnttab_copy is 40 bytes");
_Static_assert(sizeof(struct netif_tx_request) == 12, "netif_tx_request is 12 bytes");
_Static_assert(sizeof(struct netif_rx_request) == 8, "netif_rx_request is 8 bytes");

static inline uint8_t *page_of(const struct np_area *a, uint64_t pos)
{
    return a->mem + (a->gfn[(pos >> 12) % a->npages] << 12);
}

static inline uint64_t gfn_of(const struct np_area *a, uint64_t pos)
{
    return a->gfn[(pos >> 12) % a->npages];
}

int64_t pvio_np_place(struct np_area *a, uint32_t len, int check_room)
{
    uint64_t p = a->head;
    uint32_t off = (uint32_t)(p & (NP_PAGE - 1));
    if (off != 0 && (len > NP_PAGE || off + len > NP_PAGE))
        p = (p + NP_PAGE - 1) & ~(uint64_t)(NP_PAGE - 1);
    if (check_room && p + len - a->tail > (uint64_t)a->npages * NP_PAGE)
        return -1;
    a->head = p + len;
    return (int64_t)p;
}

static void put_op(uint8_t *ops, uint32_t k, uint64_t sref, uint16_t sdom, uint16_t soff, uint64_t dref,
                   uint16_t ddom, uint16_t doff, uint16_t len, uint16_t flags)
{
    struct gnttab_copy op;
    memset(&op, 0, sizeof op);
    op.source_u = sref;
    op.source_domid = sdom;
    op.source_offset = soff;
    op.dest_u = dref;
    op.dest_domid = ddom;
    op.dest_offset = doff;
    op.len = len;
    op.flags = flags;
    memcpy(ops + (size_t)k * sizeof op, &op, sizeof op);
}

static int16_t op_status(const uint8_t *ops, uint32_t k)
{
    int16_t s;
    memcpy(&s, ops + (size_t)k * sizeof(struct gnttab_copy) + __builtin_offsetof(struct gnttab_copy, status),
           sizeof s);
    return s;
}

static struct netif_tx_request tx_req(const uint8_t *reqs, uint32_t i)
{
    struct netif_tx_request r;
    memcpy(&r, reqs + (size_t)i * sizeof r, sizeof r);
    return r;
}

int pvio_np_tx_plan(const uint8_t *reqs, uint32_t n, uint32_t nr_ents, uint32_t fatal_slots,
                    uint16_t fe_domid, struct np_area *area, uint8_t *ops, uint32_t max_ops,
                    struct np_tx_pkt *pkts, struct np_tx_plan *out)
{
    memset(out, 0, sizeof *out);
    area->head = area->tail = 0;
    uint32_t i = 0, npkts = 0, nops = 0;
    while (i < n) {
        uint32_t start = i;
        struct netif_tx_request first = tx_req(reqs, i);
        if (first.id >= nr_ents) {
            out->fatal = NP_FATAL_ID;
            out->fatal_arg = first.id;
            return 0;
        }
        uint32_t j = i + 1, extras = 0;
        int extras_pending = (first.flags & NETTXF_EXTRA_INFO) != 0;
        while (extras_pending && j < n) {
            extras++;
            uint32_t ex_flags = (tx_req(reqs, j).gref >> 8) & 0xFF;
            j++;
            extras_pending = (ex_flags & XEN_NETIF_EXTRA_FLAG_MORE) != 0;
        }
        uint32_t data_start = j; /* the data slots after the first: data_start .. j */
        uint32_t nslots = 1;
        uint32_t flags = first.flags;
        while ((flags & NETTXF_MORE_DATA) && j < n) {
            nslots++;
            flags = tx_req(reqs, j).flags;
            j++;
            if (nslots + extras > fatal_slots) {
                out->fatal = NP_FATAL_SLOTS;
                return 0;
            }
        }
        if ((flags & NETTXF_MORE_DATA) || extras_pending) {
            if (j - start > fatal_slots) {
                out->fatal = NP_FATAL_SLOTS;
                return 0;
            }
            break; /* the rest of the packet is not published yet: carried */
        }
        for (uint32_t k = start + 1; k < j; k++) {
            uint16_t id = tx_req(reqs, k).id;
            if (id >= nr_ents) {
                out->fatal = NP_FATAL_ID;
                out->fatal_arg = id;
                return 0;
            }
        }
        struct np_tx_pkt *p = &pkts[npkts++];
        memset(p, 0, sizeof *p);
        p->first = start;
        p->nslots = (uint16_t)nslots;
        p->extras = (uint16_t)extras;
        p->csum = (first.flags & NETTXF_CSUM_BLANK) != 0;
        /* Validate (BackendVif._check_packet's rules, in its order). */
        int reason = NP_OK;
        int32_t first_len = first.size;
        if (nslots > XEN_NETIF_NR_SLOTS_MIN) {
            reason = NP_TOO_MANY_SLOTS;
        } else {
            for (uint32_t k = data_start; k < j; k++) {
                struct netif_tx_request r = tx_req(reqs, k);
                if (r.size == 0 || (uint32_t)r.offset + r.size > NP_PAGE) {
                    reason = NP_BAD_OFFSET;
                    break;
                }
                first_len -= r.size;
            }
            if (reason == NP_OK && first_len <= 0)
                reason = NP_BAD_SIZE;
            else if (reason == NP_OK && (uint32_t)first.offset + (uint32_t)first_len > NP_PAGE)
                reason = NP_BAD_OFFSET;
        }
        p->reason = reason;
        if (reason != NP_OK) {
            out->nbad++;
            i = j;
            continue;
        }
        int64_t pos = pvio_np_place(area, first.size, 1);
        if (pos < 0 || nops + 2 * nslots > max_ops) {
            out->fatal = NP_FATAL_INTERNAL;
            return 0;
        }
        p->pos = (uint64_t)pos;
        p->len = first.size;
        p->op = nops;
        uint64_t d = (uint64_t)pos;
        for (uint32_t k = 0; k < nslots; k++) {
            struct netif_tx_request r = tx_req(reqs, k == 0 ? start : data_start + k - 1);
            uint32_t left = k == 0 ? (uint32_t)first_len : r.size;
            uint32_t soff = r.offset;
            while (left) {
                uint32_t doff = (uint32_t)(d & (NP_PAGE - 1));
                uint32_t chunk = NP_PAGE - doff < left ? NP_PAGE - doff : left;
                put_op(ops, nops++, r.gref, fe_domid, (uint16_t)soff, gfn_of(area, d), DOMID_SELF,
                       (uint16_t)doff, (uint16_t)chunk, GNTCOPY_source_gref);
                soff += chunk;
                d += chunk;
                left -= chunk;
            }
        }
        p->nops = nops - p->op;
        i = j;
    }
    out->npkts = npkts;
    out->consumed = i;
    out->nops = nops;
    return 0;
}

/* Byte k of a frame at pos (frames longer than a page take consecutive pages from a page start). */
static inline uint8_t *at(const struct np_area *a, uint64_t pos, uint32_t k)
{
    uint64_t p = pos + k;
    return page_of(a, p) + (p & (NP_PAGE - 1));
}

/* pvio.ringbuf.netif.complete_checksum, in place. */
static void complete_checksum(const struct np_area *a, uint64_t pos, uint32_t len)
{
    if (len < 34 || *at(a, pos, 12) != 0x08 || *at(a, pos, 13) != 0x00)
        return;
    uint32_t ihl = (*at(a, pos, 14) & 0x0F) * 4u;
    uint32_t proto = *at(a, pos, 23);
    uint32_t l4 = 14 + ihl;
    uint32_t field;
    if (proto == 6)
        field = l4 + 16;
    else if (proto == 17)
        field = l4 + 6;
    else
        return;
    uint32_t total = ((uint32_t)*at(a, pos, 16) << 8) | *at(a, pos, 17);
    uint32_t end = 14 + total < len ? 14 + total : len;
    if (ihl < 20 || field + 2 > end)
        return;
    uint64_t s = 0;
    for (uint32_t k = l4; k < end; k += 2) {
        uint32_t hi = *at(a, pos, k);
        uint32_t lo = k + 1 < end ? *at(a, pos, k + 1) : 0;
        s += (hi << 8) | lo;
    }
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    uint32_t csum = ~(uint32_t)s & 0xFFFF;
    if (proto == 17 && csum == 0)
        csum = 0xFFFF;
    *at(a, pos, field) = (uint8_t)(csum >> 8);
    *at(a, pos, field + 1) = (uint8_t)csum;
}

static void put_tx_rsp(uint8_t *rsp, uint32_t k, uint16_t id, int16_t status)
{
    struct netif_tx_response r = {id, status};
    memcpy(rsp + (size_t)k * sizeof r, &r, sizeof r);
}

int pvio_np_tx_finish(const uint8_t *reqs, const uint8_t *ops, struct np_tx_pkt *pkts, uint32_t npkts,
                      struct np_area *area, uint8_t *rsp, struct np_frame *frames, struct np_tx_done *out)
{
    memset(out, 0, sizeof *out);
    uint32_t nrsp = 0, nf = 0;
    for (uint32_t x = 0; x < npkts; x++) {
        struct np_tx_pkt *p = &pkts[x];
        if (p->reason == NP_OK) {
            for (uint32_t k = 0; k < p->nops; k++) {
                int16_t s = op_status(ops, p->op + k);
                if (s != 0) {
                    p->reason = NP_BAD_GRANT;
                    p->bad_status = s;
                    break;
                }
            }
            if (p->reason == NP_OK) {
                if (p->csum) {
                    complete_checksum(area, p->pos, p->len);
                    out->checksums++;
                }
                frames[nf].pos = p->pos;
                frames[nf].len = p->len;
                frames[nf].pad = 0;
                nf++;
                out->bytes += p->len;
            }
        }
        int16_t status = p->reason == NP_OK ? NETIF_RSP_OKAY : NETIF_RSP_ERROR;
        if (p->reason != NP_OK)
            out->drops[p->reason]++;
        put_tx_rsp(rsp, nrsp++, tx_req(reqs, p->first).id, status);
        for (uint32_t k = 0; k < p->extras; k++)
            put_tx_rsp(rsp, nrsp++, 0, NETIF_RSP_NULL);
        uint32_t data_start = p->first + 1 + p->extras;
        for (uint32_t k = 1; k < p->nslots; k++)
            put_tx_rsp(rsp, nrsp++, tx_req(reqs, data_start + k - 1).id, status);
    }
    out->nrsp = nrsp;
    out->nframes = nf;
    return 0;
}

/* ------------------------------------------------------------------------------- RX */

static inline uint32_t slots_of(uint32_t len)
{
    return len == 0 ? 1 : (len + NP_PAGE - 1) / NP_PAGE;
}

static void copy_frame(const struct np_area *dst, uint64_t dpos, const struct np_area *src, uint64_t spos,
                       uint32_t len, struct np_enq_done *out)
{
    /* Both sides keep a frame of up to a page inside one page, and a longer one in whole pages
     * from a page start, so the chunks line up. */
    uint32_t done = 0;
    while (done < len || (len == 0 && done == 0)) {
        uint32_t chunk = len - done < NP_PAGE ? len - done : NP_PAGE;
        memcpy(at(dst, dpos, done), at(src, spos, done), chunk);
        out->copies++;
        out->copy_bytes += chunk;
        done += chunk;
        if (len == 0)
            break;
    }
}

int pvio_np_rx_enqueue(struct np_rxq *q, const struct np_area *src, const struct np_frame *frames,
                       const uint32_t *idx, uint32_t n, uint32_t max, struct np_enq_done *out)
{
    memset(out, 0, sizeof *out);
    if (max > q->qcap)
        max = q->qcap;
    for (uint32_t k = 0; k < n; k++) {
        const struct np_frame *f = &frames[idx ? idx[k] : k];
        int64_t pos = q->qlen < max ? pvio_np_place(&q->area, f->len, 1) : -1;
        if (pos < 0) {
            out->dropped = n - k;
            break;
        }
        if (q->qlen == 0)
            q->area.tail = (uint64_t)pos;
        copy_frame(&q->area, (uint64_t)pos, src, f->pos, f->len, out);
        struct np_frame *d = &q->q[(q->qhead + q->qlen) % q->qcap];
        d->pos = (uint64_t)pos;
        d->len = f->len;
        d->pad = 0;
        q->qlen++;
        out->queued++;
    }
    return 0;
}

uint32_t pvio_np_rx_plan(const struct np_rxq *q, uint32_t avail, uint32_t max_frames, uint32_t *need)
{
    uint32_t nf = 0, slots = 0;
    while (nf < q->qlen && nf < max_frames) {
        uint32_t s = slots_of(q->q[(q->qhead + nf) % q->qcap].len);
        if (slots + s > avail)
            break;
        slots += s;
        nf++;
    }
    *need = slots;
    return nf;
}

static struct netif_rx_request rx_req(const uint8_t *reqs, uint32_t i)
{
    struct netif_rx_request r;
    memcpy(&r, reqs + (size_t)i * sizeof r, sizeof r);
    return r;
}

uint32_t pvio_np_rx_build(const struct np_rxq *q, uint32_t nframes, const uint8_t *reqs, uint16_t fe_domid,
                          uint8_t *ops)
{
    uint32_t k = 0;
    for (uint32_t x = 0; x < nframes; x++) {
        const struct np_frame *f = &q->q[(q->qhead + x) % q->qcap];
        uint32_t ns = slots_of(f->len);
        for (uint32_t part = 0; part < ns; part++) {
            uint32_t off = part * NP_PAGE;
            uint32_t chunk = f->len - off < NP_PAGE ? f->len - off : NP_PAGE;
            uint64_t p = f->pos + off;
            struct netif_rx_request r = rx_req(reqs, k);
            put_op(ops, k, gfn_of(&q->area, p), DOMID_SELF, (uint16_t)(p & (NP_PAGE - 1)), r.gref, fe_domid, 0,
                   (uint16_t)chunk, GNTCOPY_dest_gref);
            k++;
        }
    }
    return k;
}

static void put_rx_rsp(uint8_t *rsp, uint32_t k, uint16_t id, uint16_t flags, int16_t status)
{
    struct netif_rx_response r = {id, 0, flags, status};
    memcpy(rsp + (size_t)k * sizeof r, &r, sizeof r);
}

int pvio_np_rx_finish(struct np_rxq *q, uint32_t nframes, const uint8_t *reqs, const uint8_t *ops,
                      uint8_t *rsp, struct np_rx_done *out)
{
    memset(out, 0, sizeof *out);
    uint32_t k = 0;
    for (uint32_t x = 0; x < nframes; x++) {
        const struct np_frame *f = &q->q[q->qhead];
        uint32_t ns = slots_of(f->len);
        int ok = 1;
        for (uint32_t part = 0; part < ns; part++)
            if (op_status(ops, k + part) != 0)
                ok = 0;
        for (uint32_t part = 0; part < ns; part++) {
            uint16_t id = rx_req(reqs, k + part).id;
            if (ok) {
                uint32_t off = part * NP_PAGE;
                uint32_t chunk = f->len - off < NP_PAGE ? f->len - off : NP_PAGE;
                put_rx_rsp(rsp, k + part, id, part + 1 < ns ? NETRXF_MORE_DATA : 0, (int16_t)chunk);
            } else {
                put_rx_rsp(rsp, k + part, id, 0, NETIF_RSP_ERROR);
            }
        }
        if (ok) {
            out->delivered++;
            out->delivered_bytes += f->len;
        } else {
            out->bad_grant++;
        }
        k += ns;
        q->qhead = (q->qhead + 1) % q->qcap;
        q->qlen--;
    }
    q->area.tail = q->qlen ? q->q[q->qhead].pos : q->area.head;
    out->nrsp = k;
    return 0;
}

int pvio_np_rx_load(struct np_rxq *q, const struct np_area *src, const struct np_frame *frames,
                    const uint32_t *idx, uint32_t n)
{
    if (n > q->qcap)
        n = q->qcap;
    q->area = *src;
    q->qhead = 0;
    q->qlen = n;
    for (uint32_t k = 0; k < n; k++)
        q->q[k] = frames[idx ? idx[k] : k];
    q->area.tail = n ? q->q[0].pos : q->area.head;
    return (int)n;
}

uint64_t pvio_np_gather(const struct np_area *a, const struct np_frame *frames, const uint32_t *idx,
                        uint32_t n, uint8_t *out)
{
    uint64_t o = 0;
    for (uint32_t k = 0; k < n; k++) {
        const struct np_frame *f = &frames[idx ? idx[k] : k];
        for (uint32_t done = 0; done < f->len;) {
            uint32_t chunk = f->len - done < NP_PAGE ? f->len - done : NP_PAGE;
            memcpy(out + o, at(a, f->pos, done), chunk);
            o += chunk;
            done += chunk;
        }
    }
    return o;
}

int pvio_np_spans(const struct np_area *a, const struct np_frame *frames, const uint32_t *idx, uint32_t n,
                  uint64_t *start, uint64_t *end)
{
    for (uint32_t k = 0; k < n; k++) {
        const struct np_frame *f = &frames[idx ? idx[k] : k];
        if (f->len > NP_PAGE || (f->pos & (NP_PAGE - 1)) + f->len > NP_PAGE)
            return -1;
        start[k] = (uint64_t)(page_of(a, f->pos) - a->mem) + (f->pos & (NP_PAGE - 1));
        end[k] = start[k] + f->len;
    }
    return 0;
}

/* ---------------------------------------------------------------------------- switch */

static inline uint64_t mac_at(const uint8_t *p)
{
    uint64_t m = 0;
    memcpy(&m, p, 6);
    return m;
}

static inline uint32_t mac_hash(uint64_t mac, uint32_t mask)
{
    return (uint32_t)((mac * 0x9E3779B97F4A7C15ull) >> 40) & mask;
}

static int32_t lookup(const struct np_mac_table *t, uint64_t mac)
{
    uint64_t key = mac | (1ull << 63);
    for (uint32_t h = mac_hash(mac, t->mask);; h = (h + 1) & t->mask) {
        if (t->key[h] == key)
            return t->port[h];
        if (t->key[h] == 0)
            return -1;
    }
}

int pvio_np_switch(const struct np_area *a, const struct np_frame *frames, uint32_t n,
                   const struct np_mac_table *t, uint32_t in_port, uint32_t nports,
                   const uint64_t *locked, uint32_t nlocked, int32_t *dest, uint32_t *idx,
                   uint32_t *counts, uint64_t *bytes_to, uint32_t *flooded_to, uint32_t *order,
                   struct np_sw_done *out)
{
    memset(out, 0, sizeof *out);
    for (uint32_t p = 0; p < nports; p++) {
        counts[p] = 0;
        bytes_to[p] = 0;
        flooded_to[p] = 0;
    }
#define ADD(port, i)                                    \
    do {                                                \
        uint32_t _p = (port);                           \
        if (counts[_p] == 0)                            \
            order[out->norder++] = _p;                  \
        idx[(size_t)_p * n + counts[_p]++] = (i);       \
        bytes_to[_p] += frames[i].len;                  \
    } while (0)
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len = frames[i].len;
        out->in_bytes += len;
        if (len < 14) {
            dest[i] = NP_SW_RUNT;
            out->runt++;
            continue;
        }
        if (len > NP_MAX_FRAME) {
            dest[i] = NP_SW_OVERSIZE;
            out->oversize++;
            continue;
        }
        const uint8_t *h = at(a, frames[i].pos, 0);
        uint64_t src = mac_at(h + 6), dst = mac_at(h);
        int ok = 0;
        for (uint32_t k = 0; k < nlocked; k++)
            ok |= locked[k] == src;
        if (!ok) {
            dest[i] = NP_SW_SPOOFED;
            out->spoofed++;
            continue;
        }
        if (!(h[0] & 1)) {
            int32_t e = lookup(t, dst);
            if (e == (int32_t)in_port) {
                dest[i] = NP_SW_SAME_PORT;
                out->same_port++;
                continue;
            }
            if (e >= 0) {
                dest[i] = e;
                out->forwarded++;
                ADD((uint32_t)e, i);
                continue;
            }
        }
        if (nports <= 1) {
            dest[i] = NP_SW_NO_EGRESS;
            out->no_egress++;
            continue;
        }
        dest[i] = NP_SW_FLOOD;
        out->flooded++;
        for (uint32_t p = 0; p < nports; p++) {
            if (p == in_port)
                continue;
            ADD(p, i);
            flooded_to[p]++;
        }
    }
#undef ADD
    return 0;
}

/* --------------------------------------------------------------------------- netfront */

int pvio_nf_rx(const uint8_t *rsp, uint32_t n, uint32_t nr_ents, uint8_t *posted, uint32_t parts,
               uint32_t max_slots, uint16_t *rec_id, uint16_t *rec_off, int32_t *rec_len, uint8_t *rec_kind,
               uint16_t *repost, const uint64_t *base, uint64_t *rec_start, uint64_t *rec_end,
               struct nf_rx_done *out)
{
    memset(out, 0, sizeof *out);
    uint32_t nrec = 0, nrepost = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct netif_rx_response r;
        memcpy(&r, rsp + (size_t)i * sizeof r, sizeof r);
        if (r.id >= nr_ents || !posted[r.id]) {
            out->error = NF_ERR_ID;
            out->arg = r.id;
            break;
        }
        posted[r.id] = 0;
        repost[nrepost++] = r.id;
        if (r.status < 0) {
            rec_id[nrec] = r.id;
            rec_off[nrec] = r.offset;
            rec_len[nrec] = r.status;
            rec_start[nrec] = rec_end[nrec] = 0;
            rec_kind[nrec++] = NF_STATUS;
            parts = 0;
            continue;
        }
        if (r.status == 0) {
            out->error = NF_ERR_EMPTY;
            break;
        }
        if ((uint32_t)r.offset + (uint32_t)r.status > NP_PAGE) {
            out->error = NF_ERR_CROSS;
            out->arg = r.offset;
            out->arg2 = (uint32_t)r.status;
            break;
        }
        rec_id[nrec] = r.id;
        rec_off[nrec] = r.offset;
        rec_len[nrec] = r.status;
        rec_start[nrec] = base[r.id] + r.offset;
        rec_end[nrec] = base[r.id] + r.offset + (uint32_t)r.status;
        if (r.flags & NETRXF_MORE_DATA) {
            rec_kind[nrec++] = NF_PART;
            parts++;
            if (parts >= max_slots) {
                out->error = NF_ERR_SLOTS;
                break;
            }
            continue;
        }
        rec_kind[nrec++] = parts ? NF_LAST : NF_FRAME;
        parts = 0;
    }
    out->nrec = nrec;
    out->nrepost = nrepost;
    out->parts = parts;
    return 0;
}

int pvio_nf_tx_reap(const uint8_t *rsp, uint32_t n, uint32_t nr_ents, uint8_t *outstanding, uint16_t *free_ids,
                    int16_t *errs, struct nf_tx_done *out)
{
    memset(out, 0, sizeof *out);
    for (uint32_t i = 0; i < n; i++) {
        struct netif_tx_response r;
        memcpy(&r, rsp + (size_t)i * sizeof r, sizeof r);
        if (r.status == NETIF_RSP_NULL)
            continue;
        if (r.id >= nr_ents || !outstanding[r.id]) {
            out->bad = 1;
            out->arg = r.id;
            return 0;
        }
        outstanding[r.id] = 0;
        free_ids[out->nfree++] = r.id;
        if (r.status != NETIF_RSP_OKAY)
            errs[out->nerr++] = r.status;
    }
    return 0;
}

int pvio_nf_tx_reqs(const uint16_t *sids, const uint32_t *lens, uint32_t n, const uint32_t *refs,
                    uint8_t *outstanding, uint8_t *reqs, const uint64_t *base, uint64_t *start, uint64_t *end)
{
    for (uint32_t k = 0; k < n; k++) {
        struct netif_tx_request r;
        r.gref = refs[sids[k]];
        r.offset = 0;
        r.flags = 0;
        r.id = sids[k];
        r.size = (uint16_t)lens[k];
        outstanding[sids[k]] = 1;
        start[k] = base[sids[k]];
        end[k] = base[sids[k]] + lens[k];
        memcpy(reqs + (size_t)k * sizeof r, &r, sizeof r);
    }
    return 0;
}

int pvio_nf_rx_repost(const uint16_t *ids, uint32_t n, uint32_t nr_ents, uint8_t *posted, const uint32_t *refs,
                      uint8_t *reqs)
{
    for (uint32_t k = 0; k < n; k++) {
        if (ids[k] >= nr_ents || posted[ids[k]]) {  /* undo: nothing changes */
            while (k--)
                posted[ids[k]] = 0;
            return -1;
        }
        struct netif_rx_request r;
        r.id = ids[k];
        r.pad = 0;
        r.gref = refs[ids[k]];
        posted[ids[k]] = 1;
        memcpy(reqs + (size_t)k * sizeof r, &r, sizeof r);
    }
    return (int)n;
}
