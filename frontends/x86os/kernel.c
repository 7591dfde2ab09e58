/* pvio's teaching kernel: paging, an IDT (or a trap table), a timer, two ring-3
 * processes with system calls, demand-zero pages and switches.  See os.h for the two
 * builds; the "ops" section below is the only machine-dependent code. */
#include "os.h"

#define NR_PROCS 2
#define KSTACK 8192
#define BATCH 32

static struct boot_info *const bi = (struct boot_info *)BOOT_INFO;
static volatile u64 ticks;
static u64 zeroed_pages, next_free_pfn, ops_count;
static u64 timer_period;

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void barrier(void) { asm volatile("" ::: "memory"); }

static void zero_page(void *p)
{
    u64 *q = p;
    for (int i = 0; i < 512; i++)
        q[i] = 0;
}

static void panic(const char *why, u64 v);

/* ================================================================== the ops layer */
#ifdef PVIO_PV
#define MMUEXT_PIN_L1_TABLE 0
#define MMUEXT_NEW_BASEPTR 5
#define MMUEXT_TLB_FLUSH_LOCAL 6
#define MMUEXT_INVLPG_LOCAL 7
#define PV_KERNEL_SS 0x51 /* the hypervisor's ring-1 selectors (its ABI, like Xen's FLAT_RING1_*) */
#define PV_KERNEL_CS 0x49
struct mmu_update { u64 ptr, val; };
struct mmuext_op { u32 cmd, pad; u64 arg1, arg2; };
struct trap_info { u8 vector, flags; u16 cs; u32 pad; u64 address; };
struct evtchn_bind_virq { u32 virq, vcpu, port; };
struct multicall_entry { u64 op, result, args[6]; };
struct vcpu_info *pv_vcpu_info; /* for entry.S's return path */

static struct shared_info *shinfo;
static u64 *p2m;
static u64 timer_deadline;
static struct mmu_update mmu_queue[BATCH];
static int mmu_queued;
static u32 timer_port;

static inline long hypercall(long nr, long a1, long a2, long a3, long a4)
{
    register long r10 asm("r10") = a4;
    long ret;
    asm volatile("vmcall" : "=a"(ret) : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10) : "memory");
    return ret;
}
static struct vcpu_info *vcpu(void) { return &shinfo->vcpu_info[0]; }
static void irq_disable(void) { vcpu()->evtchn_upcall_mask = 1; barrier(); }
static void irq_enable(void)
{
    barrier();
    vcpu()->evtchn_upcall_mask = 0;
    barrier();
    if (vcpu()->evtchn_upcall_pending)
        hypercall(HC_xen_version, 0, 0, 0, 0); /* any hypercall lets the pending event in */
}
static u64 mkpte(u64 pfn, u64 flags) { return p2m[pfn] << 12 | flags; }
static u64 machine_addr(void *va) { return p2m[(u64)va >> 12] << 12 | ((u64)va & 0xfff); }
static long pt_flush(void)
{
    long rc = 0;
    if (mmu_queued) {
        u64 done = 0;
        rc = hypercall(HC_mmu_update, (long)mmu_queue, mmu_queued, (long)&done, DOMID_SELF);
        mmu_queued = 0;
    }
    return rc;
}
static void set_pte(u64 *ptep, u64 val)
{
    if (mmu_queued == BATCH)
        pt_flush();
    mmu_queue[mmu_queued].ptr = machine_addr(ptep);
    mmu_queue[mmu_queued].val = val;
    mmu_queued++;
}
static long mmuext(u32 cmd, u64 arg1)
{
    struct mmuext_op op = {cmd, 0, arg1, 0};
    u64 done = 0;
    return hypercall(HC_mmuext_op, (long)&op, 1, (long)&done, DOMID_SELF);
}
__attribute__((unused)) static void flush_tlb_page(void *va) { pt_flush(); mmuext(MMUEXT_INVLPG_LOCAL, (u64)va); }
static long load_cr3(u64 pfn) { pt_flush(); return mmuext(MMUEXT_NEW_BASEPTR, p2m[pfn]); }
static u64 read_cr2(void) { return *(volatile u64 *)vcpu()->arch; }
/* A process switch's two hypervisor calls (new base pointer, kernel stack) in one multicall. */
static void switch_mm(u64 pfn, u64 stack_top)
{
    struct mmuext_op op = {MMUEXT_NEW_BASEPTR, 0, p2m[pfn], 0};
    u64 done = 0;
    struct multicall_entry mc[2] = {
        {HC_mmuext_op, 0, {(u64)&op, 1, (u64)&done, DOMID_SELF, 0, 0}},
        {HC_stack_switch, 0, {PV_KERNEL_SS, stack_top, 0, 0, 0, 0}},
    };
    pt_flush();
    if (hypercall(HC_multicall, (long)mc, 2, 0, 0) < 0 || (long)mc[0].result < 0)
        panic("multicall of the process switch", pfn);
}
static void console(const char *s, long n)
{
    hypercall(HC_console_io, CONSOLEIO_write, n, (long)s, 0);
}
static void shutdown(int crash)
{
    u32 reason = crash ? SHUTDOWN_crash : SHUTDOWN_poweroff;
    hypercall(HC_sched_op, SCHEDOP_shutdown, (long)&reason, 0, 0);
}
static void idle_once(void) { hypercall(HC_sched_op, SCHEDOP_block, 0, 0, 0); }
static u64 now_ns(void) { return *(volatile u64 *)((char *)&vcpu()->time + 16); }
static void timer_arm(void)
{
    timer_deadline += timer_period;
    hypercall(HC_set_timer_op, (long)timer_deadline, 0, 0, 0);
}
static void timer_ack(void)
{
    vcpu()->evtchn_upcall_pending = 0;
    __atomic_exchange_n(&vcpu()->evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_and(&shinfo->evtchn_pending[timer_port / 64], ~(1UL << (timer_port % 64)), __ATOMIC_SEQ_CST);
    timer_arm();
}
static void arch_init(u64 *pt_lo, u64 *pt_hi)
{
    (void)pt_lo;
    (void)pt_hi;
    static struct trap_info traps[4];
    struct evtchn_bind_virq bind = {VIRQ_TIMER, 0, 0};
    void *handlers[3] = {trap_ud, trap_gp, trap_pf};
    u8 vectors[3] = {6, 13, 14};
    for (int i = 0; i < 3; i++) {
        traps[i].vector = vectors[i];
        traps[i].cs = PV_KERNEL_CS;
        traps[i].address = (u64)handlers[i];
    }
    if (hypercall(HC_set_trap_table, (long)traps, 0, 0, 0) < 0)
        panic("set_trap_table", 0);
    hypercall(HC_set_callbacks, (long)trap_timer, 0, (long)trap_syscall, 0);
    if (hypercall(HC_event_channel_op, EVTCHNOP_bind_virq, (long)&bind, 0, 0) < 0)
        panic("bind_virq", 0);
    timer_port = bind.port;
    timer_deadline = now_ns();
    timer_arm();
}
#else
/* ---------------------------------------------------------------- bare hardware */
struct tss { u32 r0; u64 rsp0, rsp1, rsp2, r1; u64 ist[7]; u64 r2; u16 r3, iomap; } __attribute__((packed));
static u64 gdt[7];
static struct { u64 lo, hi; } idt[256];
static struct tss tss;

static void irq_disable(void) { asm volatile("cli" ::: "memory"); }
static void irq_enable(void) { asm volatile("sti" ::: "memory"); }
static u64 mkpte(u64 pfn, u64 flags) { return pfn << 12 | flags; }
static long pt_flush(void) { return 0; }
static void set_pte(u64 *ptep, u64 val) { *(volatile u64 *)ptep = val; }
static void flush_tlb_page(void *va) { asm volatile("invlpg (%0)" ::"r"(va) : "memory"); }
static long load_cr3(u64 pfn) { asm volatile("mov %0, %%cr3" ::"r"(pfn << 12) : "memory"); return 0; }
static u64 read_cr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static void set_kernel_stack(u64 top) { tss.rsp0 = top; }
static void switch_mm(u64 pfn, u64 stack_top)
{
    load_cr3(pfn);
    set_kernel_stack(stack_top);
}
static void console(const char *s, long n)
{
    for (long i = 0; i < n; i++)
        outb(PORT_CONSOLE, (u8)s[i]);
}
static void shutdown(int crash) { outl(PORT_EXIT, (u32)crash); for (;;) asm volatile("cli; hlt"); }
static void idle_once(void) { asm volatile("sti; hlt; cli" ::: "memory"); }
static void timer_ack(void) { outb(0x20, 0x20); } /* EOI to the PIC */
static void set_gate(int vec, void *handler, int dpl)
{
    u64 a = (u64)handler;
    idt[vec].lo = (a & 0xffff) | (0x08UL << 16) | ((u64)(0x8e | dpl << 5) << 40) | ((a >> 16 & 0xffff) << 48);
    idt[vec].hi = a >> 32;
}
static void arch_init(u64 *pt_lo, u64 *pt_hi)
{
    (void)pt_lo;
    (void)pt_hi;
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr, idtr;
    u64 t = (u64)&tss;
    gdt[1] = 0x00af9a000000ffffUL; /* 0x08 kernel code */
    gdt[2] = 0x00cf92000000ffffUL; /* 0x10 kernel data */
    gdt[3] = 0x00cff2000000ffffUL; /* 0x18 user data */
    gdt[4] = 0x00affa000000ffffUL; /* 0x20 user code */
    gdt[5] = (sizeof(tss) - 1) | (t & 0xffffff) << 16 | 0x89UL << 40 | (t >> 24 & 0xff) << 56;
    gdt[6] = t >> 32;
    tss.iomap = sizeof(tss);
    gdtr.limit = sizeof(gdt) - 1;
    gdtr.base = (u64)gdt;
    asm volatile("lgdt %0" ::"m"(gdtr));
    asm volatile("ltr %w0" ::"r"(0x28));
    set_gate(6, trap_ud, 0);
    set_gate(13, trap_gp, 0);
    set_gate(14, trap_pf, 0);
    set_gate(32, trap_timer, 0);
    set_gate(128, trap_syscall, 3);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u64)idt;
    asm volatile("lidt %0" ::"m"(idtr));
    /* PIT channel 0, rate generator, lobyte/hibyte */
    u64 divisor = timer_period * 1193182UL / 1000000000UL;
    outb(0x43, 0x34);
    outb(0x40, (u8)divisor);
    outb(0x40, (u8)(divisor >> 8));
}
#endif

/* ================================================================== console */
static void kputs(const char *s)
{
    long n = 0;
    while (s[n])
        n++;
    console(s, n);
}
static void kput_u(const char *what, u64 v)
{
    char buf[64], tmp[24];
    int n = 0, m = 0;
    while (what[n]) {
        buf[n] = what[n];
        n++;
    }
    buf[n++] = '=';
    do {
        tmp[m++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (m)
        buf[n++] = tmp[--m];
    buf[n++] = '\n';
    console(buf, n);
}
static void panic(const char *why, u64 v)
{
    kputs("kernel: panic: ");
    kput_u(why, v);
    shutdown(1);
}
static void phase(int id, int start) { outl(PORT_PHASE, (u32)(start ? id : id | 0x80)); }

/* ================================================================== memory */
/* Virtual pages the page-table phase remaps: below 2 MiB, so their L1 is the one the
 * kernel's own code runs through (already in use, as a busy kernel's tables are). */
#define SCRATCH_LO 440UL
#define SCRATCH_HI 504UL

static u64 alloc_frame(int zero)
{
    if (next_free_pfn >= SCRATCH_LO && next_free_pfn < SCRATCH_HI)
        next_free_pfn = SCRATCH_HI;
    u64 pfn = next_free_pfn++;
    if (pfn >= bi->nr_pages - 2)
        panic("out of memory", pfn);
    if (zero)
        zero_page((void *)(pfn << 12));
    return pfn;
}

/* A frame handed to a process as a demand-zero page: zeroed here unless the PV hint says
 * the hypervisor has already scrubbed it (it never held anything of ours). */
static u64 alloc_user_frame(void)
{
    u64 pfn = alloc_frame(0);
#ifdef PVIO_PV
    if (bi->scrubbed)
        return pfn;
#endif
    zero_page((void *)(pfn << 12));
    zeroed_pages++;
    return pfn;
}

struct proc {
    int id, alive;
    u64 pml4, pdpt, pd, pt; /* frames */
    u64 saved_rsp;
    u8 kstack[KSTACK] __attribute__((aligned(16)));
};
static struct proc procs[NR_PROCS];
static struct proc *current;
static u64 kernel_pml4, kernel_pd, kernel_pt0, idle_rsp;
static u64 *kpt(u64 pfn) { return (u64 *)((kernel_pt0 + pfn / 512) << 12) + pfn % 512; }

static void paging_init(void)
{
    u64 npt = (bi->nr_pages + 511) / 512;
    u64 pt_lo = next_free_pfn;
    kernel_pml4 = alloc_frame(1);
    u64 kpdpt = alloc_frame(1);
    kernel_pd = alloc_frame(1);
    kernel_pt0 = alloc_frame(1);
    for (u64 i = 1; i < npt; i++)
        alloc_frame(1);
    for (int p = 0; p < NR_PROCS; p++) {
        procs[p].pml4 = alloc_frame(1);
        procs[p].pdpt = alloc_frame(1);
        procs[p].pd = alloc_frame(1);
        procs[p].pt = alloc_frame(1);
    }
    u64 pt_hi = next_free_pfn;
    u64 *l4 = (u64 *)(kernel_pml4 << 12), *l3 = (u64 *)(kpdpt << 12), *l2 = (u64 *)(kernel_pd << 12);
    l4[0] = mkpte(kpdpt, PTE_P | PTE_W);
    l3[0] = mkpte(kernel_pd, PTE_P | PTE_W);
    for (u64 i = 0; i < npt; i++)
        l2[i] = mkpte(kernel_pt0 + i, PTE_P | PTE_W);
    for (u64 pfn = 1; pfn < bi->nr_pages; pfn++) {
        u64 flags = PTE_P | PTE_W;
#ifdef PVIO_PV
        u64 bpt = bi->pt_base >> 12;
        if ((pfn >= pt_lo && pfn < pt_hi) || (pfn >= bpt && pfn < bpt + 3 + npt))
            flags = PTE_P; /* page tables are never writable in a PV guest */
        if (pfn == bi->nr_pages - 1) {
            *kpt(pfn) = bi->shared_info_mfn << 12 | PTE_P | PTE_W;
            continue;
        }
#endif
        *kpt(pfn) = mkpte(pfn, flags);
    }
    u64 user_pfn = ((u64)_end - ((u64)__user_end - USER_BASE)) >> 12;
    u64 user_pages = ((u64)__user_end - USER_BASE + PAGE_SIZE - 1) >> 12;
    for (int p = 0; p < NR_PROCS; p++) {
        struct proc *pr = &procs[p];
        u64 *pl4 = (u64 *)(pr->pml4 << 12), *pl3 = (u64 *)(pr->pdpt << 12);
        u64 *pl2 = (u64 *)(pr->pd << 12), *pl1 = (u64 *)(pr->pt << 12);
        pl4[0] = mkpte(pr->pdpt, PTE_P | PTE_W | PTE_U);
        pl3[0] = mkpte(kernel_pd, PTE_P | PTE_W);
        pl3[1] = mkpte(pr->pd, PTE_P | PTE_W | PTE_U);
        pl2[0] = mkpte(pr->pt, PTE_P | PTE_W | PTE_U);
        for (u64 i = 0; i < user_pages; i++)
            pl1[i] = mkpte(user_pfn + i, PTE_P | PTE_U);
        pl1[511] = mkpte(alloc_frame(1), PTE_P | PTE_W | PTE_U); /* the stack page */
    }
#ifdef PVIO_PV
    /* Make the new tables read-only in the builder's direct map, pin them, switch. */
    u64 *boot_l1 = (u64 *)(bi->pt_base + 3 * PAGE_SIZE);
    for (u64 pfn = pt_lo; pfn < pt_hi; pfn++)
        set_pte(&boot_l1[pfn], mkpte(pfn, PTE_P));
    if (pt_flush() < 0)
        panic("mmu_update of the boot direct map", 0);
    for (u64 i = 0; i < npt; i++)
        if (mmuext(MMUEXT_PIN_L1_TABLE, p2m[kernel_pt0 + i]) < 0)
            panic("pin l1", i);
    for (int p = 0; p < NR_PROCS; p++)
        if (mmuext(MMUEXT_PIN_L1_TABLE, p2m[procs[p].pt]) < 0 ||
            mmuext(MMUEXT_PIN_L1_TABLE + 1, p2m[procs[p].pd]) < 0)
            panic("pin user tables", (u64)p);
    if (mmuext(MMUEXT_PIN_L1_TABLE + 1, p2m[kernel_pd]) < 0 || mmuext(MMUEXT_PIN_L1_TABLE + 2, p2m[kpdpt]) < 0 ||
        mmuext(MMUEXT_PIN_L1_TABLE + 3, p2m[kernel_pml4]) < 0)
        panic("pin kernel tables", 0);
    for (int p = 0; p < NR_PROCS; p++)
        if (mmuext(MMUEXT_PIN_L1_TABLE + 2, p2m[procs[p].pdpt]) < 0 ||
            mmuext(MMUEXT_PIN_L1_TABLE + 3, p2m[procs[p].pml4]) < 0)
            panic("pin process tables", (u64)p);
#endif
    (void)pt_lo;
    (void)pt_hi;
    if (load_cr3(kernel_pml4) < 0)
        panic("load cr3", kernel_pml4);
}

/* ================================================================== processes */
static void schedule(void)
{
    struct proc *prev = current, *next = 0;
    for (int i = 1; i <= NR_PROCS; i++) {
        struct proc *c = &procs[((prev ? prev->id - 1 : -1) + i) % NR_PROCS];
        if (c->alive) {
            next = c;
            break;
        }
    }
    if (next == prev)
        return;
    u64 *save = prev ? &prev->saved_rsp : &idle_rsp;
    current = next;
    if (next) {
        switch_mm(next->pml4, (u64)next->kstack + KSTACK);
        switch_stack(save, next->saved_rsp);
    } else {
        load_cr3(kernel_pml4);
        switch_stack(save, idle_rsp);
    }
}

static void proc_entry(void)
{
    return_to_user((u64)user_main, USER_STACK_TOP, (u64)current->id);
}

static void proc_init(struct proc *p, int id)
{
    p->id = id;
    p->alive = 1;
    u64 *sp = (u64 *)(p->kstack + KSTACK);
    *--sp = 0;
    *--sp = (u64)proc_entry;
    for (int i = 0; i < 6; i++)
        *--sp = 0;
    p->saved_rsp = (u64)sp;
}

/* ================================================================== traps */
static long sys_write(u64 buf, u64 len)
{
    char kbuf[128];
    if (len > sizeof(kbuf) || buf < USER_BASE || buf + len > USER_STACK_TOP)
        return -EINVAL;
    for (u64 i = 0; i < len; i++)
        kbuf[i] = ((volatile char *)buf)[i];
    console(kbuf, (long)len);
    return (long)len;
}

static void syscall(struct frame *f)
{
    switch (f->rax) {
    case SYS_write:
        f->rax = (u64)sys_write(f->rdi, f->rsi);
        break;
    case SYS_getpid:
        f->rax = (u64)current->id;
        break;
    case SYS_yield:
        f->rax = 0;
        schedule();
        break;
    case SYS_exit:
        current->alive = 0;
        schedule();
        panic("exited process ran", 0);
        break;
    case SYS_phase:
        if (f->rdi == 0)
            f->rax = ops_count;
        else
            phase((int)f->rdi, (int)f->rsi), f->rax = 0;
        break;
    case SYS_ticks:
        f->rax = ticks;
        break;
    default:
        f->rax = (u64)-ENOSYS;
    }
}

static void page_fault(struct frame *f)
{
    u64 addr = read_cr2();
    if ((f->cs & 3) != 3 || addr < USER_HEAP || addr >= USER_STACK_TOP - PAGE_SIZE)
        panic("page fault at", addr);
    u64 *pl1 = (u64 *)(current->pt << 12);
    set_pte(&pl1[(addr - USER_BASE) >> 12 & 511], mkpte(alloc_user_frame(), PTE_P | PTE_W | PTE_U));
    pt_flush();
}

void trap_dispatch(struct frame *f)
{
    switch (f->vector) {
    case 14:
        page_fault(f);
        break;
    case 32:
        ticks++;
        timer_ack();
        break;
    case 128:
        syscall(f);
        break;
    default:
        panic(f->vector == 13 ? "general protection at" : "invalid opcode at", f->rip);
    }
}

/* ================================================================== the measured kernel operations */
static void kernel_phases(void)
{
    volatile int sink = 0;
    phase(PHASE_CLI, 1);
    for (u64 i = 0; i < ops_count; i++) {
        irq_disable();
        sink++;
        irq_enable();
    }
    phase(PHASE_CLI, 0);

    phase(PHASE_PORT, 1);
    for (u64 i = 0; i < ops_count; i++)
        outb(0x80, (u8)i);
    phase(PHASE_PORT, 0);

    /* Map ops scratch pages (virtual frames at the top of the direct map) to fresh frames. */
    u64 first = SCRATCH_LO;
    u64 frames[64];
    for (u64 i = 0; i < ops_count && i < 64; i++)
        frames[i] = alloc_frame(1);
    phase(PHASE_PTE, 1);
    for (u64 i = 0; i < ops_count && i < 64; i++) {
        set_pte(kpt(first + i), mkpte(frames[i], PTE_P | PTE_W));
#ifndef PVIO_PV
        flush_tlb_page((void *)((first + i) << 12));
#endif
    }
#ifdef PVIO_PV
    pt_flush();
    mmuext(MMUEXT_TLB_FLUSH_LOCAL, 0);
#endif
    phase(PHASE_PTE, 0);
    u64 ok = 0;
    for (u64 i = 0; i < ops_count && i < 64; i++) {
        *(volatile u64 *)((first + i) << 12) = i + 1;
        ok += *(volatile u64 *)(frames[i] << 12) == i + 1;
    }
    kput_u("kernel: remapped-pages-ok", ok);
    (void)sink;
}

static void hostile(void)
{
    u64 va = (bi->nr_pages - 2) << 12;
    if (bi->hostile == 1) {
        kputs("kernel: hostile: mapping a frame outside this domain\n");
#ifdef PVIO_PV
        set_pte(kpt(bi->nr_pages - 2), (bi->nr_pages + 64) << 12 | PTE_P | PTE_W);
        long rc = pt_flush();
        kput_u("kernel: hostile: mmu_update refused, -rc", (u64)-rc);
        set_pte(kpt(bi->nr_pages - 2), p2m[bi->pt_base >> 12] << 12 | PTE_P | PTE_W);
        rc = pt_flush();
        kput_u("kernel: hostile: writable page-table mapping refused, -rc", (u64)-rc);
#else
        set_pte(kpt(bi->nr_pages - 2), (bi->nr_pages + 64) << 12 | PTE_P | PTE_W);
        flush_tlb_page((void *)va);
#endif
        kput_u("kernel: hostile: read through it", *(volatile u64 *)va);
    } else if (bi->hostile == 2) {
        kputs("kernel: hostile: loading CR3 outside memory\n");
#ifdef PVIO_PV
        long rc = mmuext(MMUEXT_NEW_BASEPTR, bi->nr_pages + 64);
        kput_u("kernel: hostile: new_baseptr refused, -rc", (u64)-rc);
        asm volatile("mov %0, %%cr3" ::"r"((bi->nr_pages + 64) << 12) : "memory");
#else
        load_cr3(bi->nr_pages + 64);
#endif
        kputs("kernel: hostile: still running\n");
    } else if (bi->hostile == 3) {
        int (*fn)(void) = (int (*)(void))smc_target;
        int before = fn();
        volatile u8 *code = (volatile u8 *)smc_target;
        code[1] = 2; /* mov $1, %eax -> mov $2, %eax */
        kput_u("kernel: smc-before", (u64)before);
        kput_u("kernel: smc-after", (u64)fn());
    }
}

void kmain(void)
{
    if (bi->magic != BOOT_MAGIC)
        for (;;)
            ;
    ops_count = bi->ops;
    timer_period = bi->timer_ns;
    next_free_pfn = bi->first_free_pfn;
#ifdef PVIO_PV
    shinfo = (struct shared_info *)((bi->nr_pages - 1) << 12);
    p2m = (u64 *)bi->p2m;
    pv_vcpu_info = &shinfo->vcpu_info[0];
#endif
    paging_init();
    kputs("kernel: paging on\n");
    arch_init(0, 0);
    irq_enable();
    kernel_phases();
    kputs("kernel: starting processes\n");
    for (int p = 0; p < NR_PROCS; p++)
        proc_init(&procs[p], p + 1);
    irq_disable(); /* the kernel runs with interrupts off; processes run with them on */
    schedule();
    kputs("kernel: all processes exited\n");
    u64 target = ticks + bi->idle_ticks;
    phase(PHASE_IDLE, 1);
    if (bi->idle_spin) {
        irq_enable();
        while (ticks < target)
            asm volatile("pause");
        irq_disable();
    } else {
        while (ticks < target)
            idle_once();
    }
    phase(PHASE_IDLE, 0);
    hostile();
    kput_u("kernel: demand-zero pages zeroed by the kernel", zeroed_pages);
    kputs("kernel: done\n");
    shutdown(0);
}
