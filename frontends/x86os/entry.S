/* Entry points of pvio's teaching kernel: boot, the trap stubs, the stack switch and the
 * way back to user mode.  Every trap stub leaves a struct frame (os.h) and calls
 * trap_dispatch.  The return differs by build: bare hardware returns with iretq; the PV
 * kernel cannot (the frame's selectors are the hypervisor's) and returns with Xen's iret
 * hypercall, pushing rax, r11, rcx and a flags word below the frame as Xen's x86-64
 * HYPERVISOR_iret expects. */
#define HC_IRET 23 /* xen.h: __HYPERVISOR_iret (pvio_abi.h is C only) */

    .section .text.boot, "ax"
    .globl _start
_start:
    lea     boot_stack_top(%rip), %rsp
    xor     %ebp, %ebp
    call    kmain
1:  jmp     1b

    .text
.macro TRAP name, vector, has_err
    .globl \name
\name:
    .if \has_err == 0
    pushq   $0
    .endif
    pushq   $\vector
    jmp     trap_common
.endm
    TRAP trap_ud, 6, 0
    TRAP trap_gp, 13, 1
    TRAP trap_pf, 14, 1
    TRAP trap_timer, 32, 0
    TRAP trap_syscall, 128, 0

trap_common:
    push %rax; push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp
    push %r8; push %r9; push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    mov     %rsp, %rdi
    call    trap_dispatch
    .globl trap_return
trap_return:
    pop %r15; pop %r14; pop %r13; pop %r12; pop %r11; pop %r10; pop %r9; pop %r8
    pop %rbp; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rbx; pop %rax
    add     $16, %rsp               /* vector, error code */
#ifdef PVIO_PV
    /* The frame's selectors are the hypervisor's real ring-1/ring-3 ones, so a native
     * iretq works (as 32-bit Xen PV kernels return from ring 1): events stay masked when
     * the frame has IF clear; otherwise unmask, and if an event is already pending take
     * Xen's iret hypercall instead, which delivers it. */
    testl   $0x200, 16(%rsp)
    jz      2f
    push    %rax
    mov     pv_vcpu_info(%rip), %rax
    movb    $0, 1(%rax)             /* vcpu_info.evtchn_upcall_mask */
    cmpb    $0, (%rax)              /* vcpu_info.evtchn_upcall_pending */
    pop     %rax
    jne     3f
2:  iretq
3:  pushq   $0                      /* flags: not in a syscall */
    push    %rcx
    push    %r11
    push    %rax
    mov     $HC_IRET, %eax
    vmcall
    ud2                             /* iret does not return */
#else
    iretq
#endif

/* switch_stack(u64 *save_rsp, u64 new_rsp): save the callee-saved registers on this stack,
 * store its rsp, load the other one and restore its registers. */
    .globl switch_stack
switch_stack:
    push %rbx; push %rbp; push %r12; push %r13; push %r14; push %r15
    mov     %rsp, (%rdi)
    mov     %rsi, %rsp
    pop %r15; pop %r14; pop %r13; pop %r12; pop %rbp; pop %rbx
    ret

/* return_to_user(rip, rsp, arg): the first entry of a process into ring 3 (arg in rdi),
 * through the same path as every return from a trap (a frame built by hand). */
    .globl return_to_user
return_to_user:
#ifdef PVIO_PV
    pushq   $0x5b                   /* ss: the hypervisor's ring-3 data selector */
    push    %rsi
    pushq   $0x202
    pushq   $0x63                   /* cs: the hypervisor's ring-3 code selector */
#else
    pushq   $0x1b                   /* ss: user data */
    push    %rsi
    pushq   $0x202
    pushq   $0x23                   /* cs: user code */
#endif
    push    %rdi
    pushq   $0
    pushq   $0
    sub     $120, %rsp              /* fifteen zeroed registers */
    mov     %rsp, %rdi
    mov     $15, %ecx
1:  movq    $0, (%rdi)
    add     $8, %rdi
    loop    1b
    mov     %rdx, 72(%rsp)          /* the frame's rdi */
    jmp     trap_return

    .bss
    .align 16
    .space 8192
boot_stack_top:

/* A function the self-modifying-code test rewrites (returns 1 until patched). */
    .text
    .align 16
    .globl smc_target
smc_target:
    mov     $1, %eax
    ret
    .space 10, 0x90
