/* GNTTABOP_copy in C: see gnttab.h.  Status numbers are Xen's GNTST_* values. */
#include "gnttab.h"

#include <string.h>

#define PAGE_SIZE 4096u
#define DOMID_SELF 0x7FF0u
#define GTF_TYPE_MASK 3u
#define GTF_PERMIT_ACCESS 1u
#define GTF_READONLY 4u
#define GNTCOPY_SOURCE_GREF 1u
#define GNTCOPY_DEST_GREF 2u

enum {
    GNTST_okay = 0,
    GNTST_general_error = -1,
    GNTST_bad_domain = -2,
    GNTST_bad_gntref = -3,
    GNTST_permission_denied = -8,
    GNTST_bad_page = -9,
    GNTST_bad_copy_arg = -10,
};

/* struct gnttab_copy, x86_64: source {u64 ref|gmfn, u16 domid, u16 offset} @0, dest @16,
 * len u16 @32, flags u16 @34, status s16 @36; 40 bytes. */
struct copy_op {
    uint64_t sref;
    uint16_t sdom, soff;
    uint32_t pad0;
    uint64_t dref;
    uint16_t ddom, doff;
    uint32_t pad1;
    uint16_t len, flags;
    int16_t status;
    uint16_t pad2;
};
_Static_assert(sizeof(struct copy_op) == 40, "gnttab_copy is 40 bytes on x86_64");

static const struct pvio_gt_dom *find_dom(const struct pvio_gt_dom *doms, unsigned int n,
                                          const struct pvio_gt_dom *caller, uint32_t domid)
{
    if (domid == DOMID_SELF)
        return caller;
    for (unsigned int i = 0; i < n; i++)
        if (doms[i].domid == domid)
            return &doms[i];
    return NULL;
}

/* Resolve one side to the page it names, after every check copy_side makes. */
static int resolve(const struct pvio_gt_dom *doms, unsigned int n, const struct pvio_gt_dom *caller,
                   int is_gref, uint64_t ref, uint16_t domid, int write, uint8_t **page)
{
    if (is_gref) {
        ref = (uint32_t)ref; /* u.ref: a grant_ref_t is the low 32 bits of the union, as Xen reads it */
        const struct pvio_gt_dom *d = find_dom(doms, n, caller, domid);
        if (d == NULL)
            return GNTST_bad_domain;
        if (ref >= d->nr_entries)
            return GNTST_bad_gntref;
        uint8_t raw[8];
        memcpy(raw, d->mem + (d->gnttab_gfn << 12) + ref * 8u, sizeof raw); /* read the entry once */
        uint16_t flags, gdom;
        uint32_t frame;
        memcpy(&flags, raw, 2);
        memcpy(&gdom, raw + 2, 2);
        memcpy(&frame, raw + 4, 4);
        if ((flags & GTF_TYPE_MASK) != GTF_PERMIT_ACCESS)
            return GNTST_general_error;
        if (gdom != caller->domid)
            return GNTST_permission_denied;
        if (write && (flags & GTF_READONLY))
            return GNTST_permission_denied;
        if (frame >= d->nr_pages)
            return GNTST_bad_page;
        *page = d->mem + ((uint64_t)frame << 12);
        return GNTST_okay;
    }
    if (domid != DOMID_SELF && domid != caller->domid)
        return GNTST_permission_denied;
    if (ref >= caller->nr_pages)
        return GNTST_bad_page;
    *page = caller->mem + (ref << 12);
    return GNTST_okay;
}

int pvio_gnttab_copy(const struct pvio_gt_dom *doms, unsigned int ndoms, unsigned int caller_idx,
                     uint8_t *ops, unsigned int count, struct pvio_copy_stats *stats)
{
    const struct pvio_gt_dom *caller = &doms[caller_idx];
    for (unsigned int i = 0; i < count; i++) {
        struct copy_op op;
        memcpy(&op, ops + (size_t)i * sizeof op, sizeof op); /* copy the element out once */
        int status = GNTST_okay;
        if (op.len != 0) {
            uint8_t *src, *dst;
            if ((uint32_t)op.soff + op.len > PAGE_SIZE || (uint32_t)op.doff + op.len > PAGE_SIZE)
                status = GNTST_bad_copy_arg;
            if (status == GNTST_okay)
                status = resolve(doms, ndoms, caller, op.flags & GNTCOPY_SOURCE_GREF, op.sref, op.sdom, 0, &src);
            if (status == GNTST_okay)
                status = resolve(doms, ndoms, caller, op.flags & GNTCOPY_DEST_GREF, op.dref, op.ddom, 1, &dst);
            if (status == GNTST_okay)
                memmove(dst + op.doff, src + op.soff, op.len);
        }
        int16_t out = (int16_t)status;
        memcpy(ops + (size_t)i * sizeof op + 36, &out, sizeof out);
        if (status == GNTST_okay) {
            stats->copies++;
            stats->bytes += op.len;
        } else {
            stats->errors[-status & 15]++;
        }
    }
    return 0;
}
