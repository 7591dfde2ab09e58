/*
 * pvio native fast path: GNTTABOP_copy over a batch, in C.
 *
 * The grant-copy hypercall is the per-packet work of a split driver (netback copies
 * every TX slot in and every RX slot out), so it is the one hypervisor operation that
 * runs per packet.  This is the same operation as pvio/grant_table.py's copy_one,
 * check for check and status for status (a differential test holds them equal); the
 * Python version stays the readable reference.
 *
 * The hypervisor describes every live domain in a pvio_gt_dom (its RAM and where its
 * grant table lives).  Every element of the batch is copied out of the caller's memory
 * once, every reference, frame, offset and length is range-checked before any byte
 * moves, and the element's GNTST status is written back in place.
 *
 * The text between the markers is the cffi cdef (pvio/_native_build.py).
 */
#ifndef PVIO_GNTTAB_H
#define PVIO_GNTTAB_H

#include <stdint.h>

/* cffi-cdef-begin */

/* One live domain as the grant-copy fast path sees it. */
struct pvio_gt_dom {
    uint8_t *mem;          /* the domain's RAM (one host buffer) */
    uint64_t nr_pages;     /* frames in it */
    uint64_t gnttab_gfn;   /* first grant-table frame (the frames are contiguous) */
    uint64_t nr_entries;   /* grant_entry_v1 entries in the table */
    uint32_t domid;
    uint32_t pad;
};

/* What a batch did, for the caller's counters. errors[k] counts status -k. */
struct pvio_copy_stats {
    uint64_t copies;       /* elements that succeeded (zero-length ones included) */
    uint64_t bytes;        /* bytes they moved */
    uint32_t errors[16];
};

/*
 * GNTTABOP_copy of `count` 40-byte gnttab_copy elements at `ops` (in the caller's
 * memory, already bounds-checked), for doms[caller].  Returns 0.
 */
int pvio_gnttab_copy(const struct pvio_gt_dom *doms, unsigned int ndoms, unsigned int caller,
                     uint8_t *ops, unsigned int count, struct pvio_copy_stats *stats);

/* cffi-cdef-end */

#endif
