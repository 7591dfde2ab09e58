/* Entry and event-upcall stubs of the pvio x86 guest kernel.
 *
 * _start: pvio (like Xen for a 64-bit PV guest) enters with RSI = start_info's address
 * and events masked; the stack is ours to choose.
 *
 * hypervisor_callback: the event upcall.  The hypervisor left Xen's x86-64 bounce frame
 * on our stack (low to high: RCX, R11, RIP, CS, RFLAGS, RSP, SS) and set upcall_mask.
 * We pop RCX and R11 back into their registers, save every general register, run the C
 * scan with a 16-byte aligned stack, restore, push the iret "flags" word (0) and jump to
 * the iret stub, which pushes RCX, R11 and RAX and traps: the hypervisor restores the
 * interrupted context and the upcall mask from that frame.  The kernel is built with
 * -mgeneral-regs-only, so no SSE/x87 state needs saving. */

    .section .text.boot, "ax"
    .globl _start
_start:
    lea     boot_stack_top(%rip), %rsp
    xor     %ebp, %ebp
    mov     %rsi, %rdi
    call    kmain
1:  ud2
    jmp     1b

    .text
    .globl hypervisor_callback
hypervisor_callback:
    pop     %rcx
    pop     %r11
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %rbp
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %rsp, %rbx
    and     $-16, %rsp
    call    do_hypervisor_callback
    mov     %rbx, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rbp
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    pushq   $0
    jmp     *hypercall_iret(%rip)

    .bss
    .balign 16
boot_stack:
    .skip   65536
    .globl boot_stack_top
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
