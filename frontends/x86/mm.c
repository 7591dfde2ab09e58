/* The page allocator: a stack of free frames between the end of the kernel image and
 * the first frame the hypervisor reserves (start_info's free_end).  Pages are never
 * given back in this kernel (drivers keep theirs for the domain's life), so a bump
 * allocator with a bound check is all it needs; each page is zeroed when handed out. */
#include "pvio.h"

static u64 next_gfn, end_gfn;

void mm_init(u64 first_gfn, u64 limit_gfn)
{
    next_gfn = first_gfn;
    end_gfn = limit_gfn;
}

u64 alloc_page(void)
{
    if (next_gfn >= end_gfn)
        panic("out of memory: no free page left");
    u64 gpa = next_gfn++ << PAGE_SHIFT;
    memset((void *)gpa, 0, PAGE_SIZE);
    return gpa;
}

u64 pages_free(void)
{
    return end_gfn - next_gfn;
}
