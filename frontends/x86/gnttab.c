/* Grant table v1, granting side.  The table frames are our own memory (pvio's domain
 * map, start_info extension); references 0-7 are reserved.  Granting writes domid and
 * frame, then (after a write barrier) the flags, so the grantee never sees a valid
 * entry with a stale frame.  Revoking is the atomic protocol: cmpxchg the flags to 0
 * only while neither GTF_reading nor GTF_writing is set; a grant the peer still maps
 * cannot be revoked, and its reference (and page) are not reused. */
#include "pvio.h"

#define MAX_REFS 4096
static struct grant_entry_v1 *table;
static u32 nr_refs;
static u32 free_refs[MAX_REFS];
static u32 nr_free;
u64 grants_still_mapped;

void gnttab_init(u64 table_gfn, u32 frames)
{
    table = (struct grant_entry_v1 *)(table_gfn << PAGE_SHIFT);
    nr_refs = frames * (PAGE_SIZE / sizeof(struct grant_entry_v1));
    if (nr_refs > MAX_REFS)
        nr_refs = MAX_REFS;
    for (u32 ref = nr_refs; ref-- > GNTTAB_NR_RESERVED_ENTRIES;)
        free_refs[nr_free++] = ref;
}

u32 gnttab_grant_access(u16 domid, u64 gfn, int readonly)
{
    if (!nr_free)
        panic("grant table full");
    u32 ref = free_refs[--nr_free];
    table[ref].domid = domid;
    table[ref].frame = (u32)gfn;
    wmb();
    WRITE_ONCE(table[ref].flags, (u16)(GTF_permit_access | (readonly ? GTF_readonly : 0)));
    return ref;
}

/* 1 if the grant was revoked (the ref is free again), 0 if the grantee still uses it. */
int gnttab_end_access(u32 ref)
{
    if (ref < GNTTAB_NR_RESERVED_ENTRIES || ref >= nr_refs)
        return 0;
    u16 flags = READ_ONCE(table[ref].flags);
    do {
        if (flags & (GTF_reading | GTF_writing)) {
            grants_still_mapped++;
            return 0;
        }
    } while (!__atomic_compare_exchange_n(&table[ref].flags, &flags, 0, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    free_refs[nr_free++] = ref;
    return 1;
}
