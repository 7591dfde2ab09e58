/* pvio's teaching kernel: one source, built two ways.
 *
 * Without PVIO_PV it is written for bare x86-64 hardware: cli/sti, hlt, in/out, mov to
 * CR3, invlpg, lidt/lgdt/ltr, an IDT, the PIT, and page tables it writes with plain
 * stores.  pvio runs that build deprivileged (trap-and-emulate, binary translation).
 * With PVIO_PV it is paravirtualized for Xen's interface: the virtual IF is
 * vcpu_info.evtchn_upcall_mask, page tables hold machine frames and change only through
 * batched mmu_update/mmuext_op, traps are registered with set_trap_table, the kernel
 * stack with stack_switch, system calls arrive on the syscall callback, the timer is
 * set_timer_op + VIRQ_TIMER, and idle is SCHEDOP_block.  The machine-dependent part is
 * the small "ops" layer in kernel.c; everything else is shared. */
#ifndef PVIO_OS_H
#define PVIO_OS_H
#include "pvio_abi.h"

#define PAGE_SIZE 4096UL
#define PTE_P 1UL
#define PTE_W 2UL
#define PTE_U 4UL
#define PTE_ADDR 0x000ffffffffff000UL

/* Guest-virtual layout (identity direct map of guest-physical memory in 0..1 GiB). */
#define USER_BASE 0x40000000UL      /* user code (the image's .user pages, read-only) */
#define USER_HEAP 0x40100000UL      /* demand-zero heap */
#define USER_STACK_TOP 0x40200000UL /* one stack page below this */
#define BOOT_INFO 0x1000UL          /* struct boot_info, written by the monitor / builder */

/* Phase markers: port writes the monitor attributes counters by (start: id, end: id|0x80). */
#define PORT_PHASE 0x510
#define PORT_CONSOLE 0xe9
#define PORT_EXIT 0x501
#define PHASE_CLI 1
#define PHASE_PORT 2
#define PHASE_PTE 3
#define PHASE_SYSCALL 4
#define PHASE_FAULT 5
#define PHASE_SWITCH 6
#define PHASE_TIMER 7
#define PHASE_IDLE 8
#define PHASE_NULL 9

#define BOOT_MAGIC 0x70766f73UL /* "pvos" */

/* Written by the monitor (native) or the domain builder (PV) before the kernel runs. */
struct boot_info {
    u64 magic;
    u64 nr_pages;        /* guest-physical pages */
    u64 ops;             /* repetitions of each measured operation */
    u64 idle_ticks;      /* timer ticks to idle for at the end */
    u64 idle_spin;       /* 1: idle by spinning, 0: hlt (native) / SCHEDOP_block (PV) */
    u64 hostile;         /* 0: well behaved; 1 bad mapping, 2 bad privileged op, 3 self-modifying code */
    u64 scrubbed;        /* PV hint: frames never used before are already zero */
    u64 shared_info_mfn; /* PV: machine frame of shared_info */
    u64 p2m;             /* PV: guest-physical address of the p2m (u64 mfn per pfn) */
    u64 pt_base;         /* PV: guest-physical address of the builder's (pinned) L4 */
    u64 first_free_pfn;  /* first frame the kernel may allocate */
    u64 timer_ns;        /* timer period */
};

/* Saved by entry.S on every trap, low to high. */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, err, rip, cs, rflags, rsp, ss;
};

enum { SYS_write = 1, SYS_getpid, SYS_yield, SYS_exit, SYS_phase, SYS_ticks };

void trap_dispatch(struct frame *f);
void switch_stack(u64 *save_rsp, u64 new_rsp);
void user_start(void);
void return_to_user(u64 rip, u64 rsp, u64 arg);
extern char trap_gp[], trap_pf[], trap_timer[], trap_syscall[], trap_ud[];
extern char __user_start[], __user_end[], _end[], smc_target[];
int user_main(int id);
#endif
