/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * PVH entry of the irqbridge Cloud Hypervisor guest (see docs/cloud-hypervisor.md).
 *
 * Cloud Hypervisor loads the ELF's PT_LOAD segments at their physical addresses and enters
 * the address in the XEN_ELFNOTE_PHYS32_ENTRY note in 32-bit protected mode, paging off,
 * flat segments, EBX = physical address of the hvm_start_info. This file switches to long
 * mode with a far jump (no 32-bit iret: the nested KVM of the CI machines cannot emulate it),
 * identity-maps 0..4 GiB with 2 MiB pages (the top GiB uncached: PCI holes, IOAPIC, LAPIC),
 * installs a 256-entry IDT whose stubs call isr_dispatch() in guest.c, and calls
 * guest_main(start_info).
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define CR0_PE 1
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define SEL_CODE64 0x08
#define SEL_DATA 0x10

    /* The PVH entry note: name "Xen", type 18, a 32-bit physical entry address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz */
    .long 4                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY  /* type */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %ebp                  /* start_info, kept for guest_main */

    /* Zero .bss: nothing says the loader did (and a reboot may reuse guest memory). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb

    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories of 512 2 MiB pages each. */
    mov $pml4, %edi
    mov $pdpt, %eax
    or $0x3, %eax
    mov %eax, (%edi)
    mov $pdpt, %edi
    mov $pd, %eax
    or $0x3, %eax
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    loop 1b
    /* 2048 entries: physical j << 21, P|RW|PS, plus PWT|PCD from 3 GiB up. */
    mov $pd, %edi
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    cmp $1536, %ecx
    jb 3f
    or $0x18, %eax
3:  mov %eax, (%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    lgdt gdt_ptr
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $(CR0_PG | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $SEL_CODE64, $long_mode

    .code64
long_mode:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $stack_top, %rsp

    /* IDT: 256 64-bit interrupt gates (IF cleared on entry) on the stubs below. */
    lea idt(%rip), %rdi
    lea isr_stubs(%rip), %rsi
    xor %ecx, %ecx
4:  mov %rsi, %rax
    mov %ax, (%rdi)                 /* offset 15:0 */
    movw $SEL_CODE64, 2(%rdi)
    movw $0x8e00, 4(%rdi)           /* present, DPL 0, interrupt gate, IST 0 */
    shr $16, %rax
    mov %ax, 6(%rdi)                /* offset 31:16 */
    shr $16, %rax
    mov %eax, 8(%rdi)               /* offset 63:32 */
    movl $0, 12(%rdi)
    add $16, %rdi
    add $16, %rsi
    inc %ecx
    cmp $256, %ecx
    jb 4b
    lidt idt_ptr(%rip)

    mov %ebp, %edi                  /* guest_main(start_info) */
    call guest_main
5:  cli
    hlt
    jmp 5b

    /* One 16-byte stub per vector: push a dummy error code when the CPU pushes none, then
       the vector, and go to the common path. */
    .macro isr_stub v
    .balign 16
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp isr_common
    .endm

    .balign 16
isr_stubs:
    .altmacro
    .set vec, 0
    .rept 256
    isr_stub %vec
    .set vec, vec + 1
    .endr
    .noaltmacro

    /* Saves the general registers (struct frame in guest.c), calls isr_dispatch(frame). The
       stack is 16-byte aligned at the call: the CPU aligns it before its 5 pushes, then come
       2 + 15 pushes, 22 in all. */
isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call isr_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp                   /* vector and error code */
    iretq

    .section .rodata
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .section .bss
    .balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096
idt:
    .skip 256 * 16
    .balign 16
stack:
    .skip 64 * 1024
stack_top:
