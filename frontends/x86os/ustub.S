/* The user side of a system call: rax = number, rdi/rsi/rdx = arguments, rax = result.
 * Bare hardware enters the kernel with int $0x80 through the IDT; the PV kernel takes
 * system calls on Xen's syscall callback (the "direct" path: no trap table lookup).  The
 * user programs (user.c) are the same C in both builds: only this stub differs, as a
 * C library's system-call stub does between int $0x80 and syscall. */
    .section .user.text, "ax"
    .globl sys_call
sys_call:
    mov     %rdi, %rax
    mov     %rsi, %rdi
    mov     %rdx, %rsi
    mov     %rcx, %rdx
#ifdef PVIO_PV
    syscall
#else
    int     $0x80
#endif
    ret
