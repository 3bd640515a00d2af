# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# irqbridge guest agent: a bare-metal x86-64 program driven by the host through a mailbox in
# guest memory (see integration/README.md for the memory map and the mailbox ABI).
#
# The VMM loads this binary at AGENT_GPA, enters it in 64-bit long mode (GDT, identity page
# tables, IDT and stack set up by the VMM) with interrupts disabled, and points IDT gates 0..255
# at the interrupt stubs whose offset and stride are given in the header below.
#
# Built with `as --64` + `objcopy -O binary`: there is no linker, so the code must not need
# relocations. Every data address is an absolute numeric constant below 2 GiB, and every code
# reference is PC-relative within this one section.

        .text
        .code64

# ---- guest memory map (must match integration/src/layout.rs) -----------------------------------
        .equ ABI_VERSION,       1
        .equ AGENT_GPA,         0x100000
        .equ STACK_TOP,         0x30000
        .equ MAILBOX,           0x10000
        .equ ACTIONS,           0x11000
        .equ ACTION_SIZE,       64
        .equ COUNTS,            0x15000
        .equ PORT_COUNTS,       0x16000

# mailbox fields
        .equ MB_SEQ,            MAILBOX + 0x00
        .equ MB_DONE,           MAILBOX + 0x08
        .equ MB_CMD,            MAILBOX + 0x10
        .equ MB_ARG0,           MAILBOX + 0x18
        .equ MB_ARG1,           MAILBOX + 0x20
        .equ MB_ARG2,           MAILBOX + 0x28
        .equ MB_ARG3,           MAILBOX + 0x30
        .equ MB_STATUS,         MAILBOX + 0x38
        .equ MB_RESULT,         MAILBOX + 0x40
        .equ MB_READY,          MAILBOX + 0x48
        .equ MB_WAKEUPS,        MAILBOX + 0x50
        .equ MB_IRQ_MODE,       MAILBOX + 0x58
        .equ MB_FAULT_VECTOR,   MAILBOX + 0x60
        .equ MB_FAULT_ERROR,    MAILBOX + 0x68
        .equ MB_FAULT_RIP,      MAILBOX + 0x70
        .equ MB_FAULT_CR2,      MAILBOX + 0x78

        .equ READY_MAGIC,       0x5944414552544741      # "AGTREADY" little-endian

# commands
        .equ CMD_NOP,           0
        .equ CMD_WRITE32,       1
        .equ CMD_READ32,        2
        .equ CMD_WRITE64,       3
        .equ CMD_READ64,        4
        .equ CMD_WRITE32_REPEAT, 5
        .equ CMD_LAPIC_ENABLE,  6
        .equ CMD_IOAPIC_ROUTE,  7
        .equ CMD_IRQ_MODE,      8
        .equ CMD_STOP,          9

        .equ STATUS_OK,         0
        .equ STATUS_UNKNOWN,    1

# action entry fields and flags
        .equ ACT_FLAGS,         0x00
        .equ ACT_MMIO_GPA,      0x08
        .equ ACT_MMIO_VALUE,    0x10
        .equ ACT_N,             0x18
        .equ ACT_EVTCHN_PAGE,   0x20
        .equ ACT_EVTCHN_UPCALL, 0x28
        .equ ACT_HITS,          0x30
        .equ ACTF_EOI,          1
        .equ ACTF_MMIO_AFTER_N, 2
        .equ ACTF_EVTCHN,       4

# event-channel page (docs/device-abi.md, "Event channels")
        .equ EVT_PENDING,       0x000
        .equ EVT_MASK,          0x200
        .equ EVT_UPCALLS,       0x400

# platform
        .equ LAPIC_BASE,        0xfee00000
        .equ LAPIC_TPR,         0x80
        .equ LAPIC_EOI,         0xb0
        .equ LAPIC_SVR,         0xf0
        .equ IOAPIC_BASE,       0xfec00000
        .equ IOAPIC_IOWIN,      0x10
        .equ EXIT_PORT,         0x510
        .equ FAULT_PORT,        0x511

# ---- header (read by the VMM) ---------------------------------------------------------------------
agent_start:
        .ascii "IRQBAGNT"                       # 0x00 magic
        .long ABI_VERSION                       # 0x08
        .long entry - agent_start               # 0x0c entry offset
        .long stubs - agent_start               # 0x10 interrupt stubs offset
        .long 16                                # 0x14 stub stride
        .long stubs_end - stubs                 # 0x18 stubs length (256 * stride)
        .long 0                                 # 0x1c reserved
        .quad MAILBOX                           # 0x20
        .quad ACTIONS                           # 0x28
        .quad COUNTS                            # 0x30
        .quad PORT_COUNTS                       # 0x38
        .quad STACK_TOP                         # 0x40
        .quad AGENT_GPA                         # 0x48

# ---- entry and main loop --------------------------------------------------------------------------
        .balign 16
entry:
        cli
        mov     $STACK_TOP, %esp                # zero-extends into %rsp
        # Mask both 8259s: GSIs 0-15 also reach the PIC and LINT0 is ExtINT after reset.
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1
        # Software-enable the local APIC (spurious vector 0xff) and accept every priority.
        mov     $LAPIC_BASE, %ebx
        movl    $0, LAPIC_TPR(%rbx)
        movl    $0x1ff, LAPIC_SVR(%rbx)
        movq    $1, MB_IRQ_MODE
        movq    $0, MB_WAKEUPS
        mov     MB_SEQ, %rax
        mov     %rax, MB_DONE                   # nothing pending at boot
        mov     $READY_MAGIC, %rax
        mov     %rax, MB_READY

main_loop:
        cli
        mov     MB_SEQ, %r15
        cmp     MB_DONE, %r15
        jne     run_command
        cmpq    $0, MB_IRQ_MODE
        je      poll_idle
        sti                                     # sti; hlt: no interrupt can slip in between
        hlt
        lock incq MB_WAKEUPS
        jmp     main_loop
poll_idle:
        pause
        jmp     main_loop

# %r15 = the sequence number being served.
run_command:
        movq    $STATUS_OK, MB_STATUS
        mov     MB_CMD, %rax
        cmp     $CMD_NOP, %rax
        je      command_done
        cmp     $CMD_WRITE32, %rax
        je      cmd_write32
        cmp     $CMD_READ32, %rax
        je      cmd_read32
        cmp     $CMD_WRITE64, %rax
        je      cmd_write64
        cmp     $CMD_READ64, %rax
        je      cmd_read64
        cmp     $CMD_WRITE32_REPEAT, %rax
        je      cmd_write32_repeat
        cmp     $CMD_LAPIC_ENABLE, %rax
        je      cmd_lapic_enable
        cmp     $CMD_IOAPIC_ROUTE, %rax
        je      cmd_ioapic_route
        cmp     $CMD_IRQ_MODE, %rax
        je      cmd_irq_mode
        cmp     $CMD_STOP, %rax
        je      cmd_stop
        movq    $STATUS_UNKNOWN, MB_STATUS
command_done:
        mov     %r15, MB_DONE                   # stores are ordered: result/status first
        jmp     main_loop

cmd_write32:                                    # arg0 = gpa, arg1 = value
        mov     MB_ARG0, %rdx
        mov     MB_ARG1, %rax
        movl    %eax, (%rdx)
        jmp     command_done

cmd_read32:                                     # arg0 = gpa -> result
        mov     MB_ARG0, %rdx
        movl    (%rdx), %eax                    # zero-extends
        mov     %rax, MB_RESULT
        jmp     command_done

cmd_write64:
        mov     MB_ARG0, %rdx
        mov     MB_ARG1, %rax
        movq    %rax, (%rdx)
        jmp     command_done

cmd_read64:
        mov     MB_ARG0, %rdx
        movq    (%rdx), %rax
        mov     %rax, MB_RESULT
        jmp     command_done

cmd_write32_repeat:                             # arg0 = gpa, arg1 = value, arg2 = count
        mov     MB_ARG0, %rdx
        mov     MB_ARG1, %rax
        mov     MB_ARG2, %rcx
1:      test    %rcx, %rcx
        jz      command_done
        movl    %eax, (%rdx)
        dec     %rcx
        jmp     1b

cmd_lapic_enable:                               # arg0 = spurious-vector register value
        mov     $LAPIC_BASE, %ebx
        movl    $0, LAPIC_TPR(%rbx)
        mov     MB_ARG0, %rax
        movl    %eax, LAPIC_SVR(%rbx)
        jmp     command_done

cmd_ioapic_route:                               # arg0 = pin, arg1 = low dword, arg2 = high dword
        mov     $IOAPIC_BASE, %ebx
        mov     MB_ARG0, %rcx
        and     $0xff, %ecx
        lea     0x10(,%rcx,2), %ecx             # IOREDTBL low dword index
        lea     1(%rcx), %edx
        movl    %edx, (%rbx)                    # high dword (destination) first
        mov     MB_ARG2, %rax
        movl    %eax, IOAPIC_IOWIN(%rbx)
        movl    %ecx, (%rbx)                    # then the low dword, which holds the mask bit
        mov     MB_ARG1, %rax
        movl    %eax, IOAPIC_IOWIN(%rbx)
        jmp     command_done

cmd_irq_mode:                                   # arg0 = 1: sti;hlt when idle, 0: poll with IF=0
        mov     MB_ARG0, %rax
        mov     %rax, MB_IRQ_MODE
        jmp     command_done

cmd_stop:
        mov     %r15, MB_DONE
        mov     $EXIT_PORT, %dx
        xor     %eax, %eax
        out     %al, %dx
1:      cli
        hlt
        jmp     1b

# ---- interrupt handling ---------------------------------------------------------------------------
# Stack on entry to isr_common: vector, error code (real or 0), rip, cs, rflags, rsp, ss.
isr_common:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        mov     80(%rsp), %rbx                  # vector
        cmp     $32, %rbx
        jb      exception
        and     $0xff, %ebx
        mov     %rbx, %rsi
        shl     $6, %rsi                        # * ACTION_SIZE
        add     $ACTIONS, %rsi
        lock incq ACT_HITS(%rsi)
        mov     ACT_HITS(%rsi), %rcx
        mov     ACT_FLAGS(%rsi), %rdi
        test    $ACTF_MMIO_AFTER_N, %rdi
        jz      1f
        cmp     ACT_N(%rsi), %rcx
        jb      1f
        mov     ACT_MMIO_GPA(%rsi), %rdx
        mov     ACT_MMIO_VALUE(%rsi), %rax
        movl    %eax, (%rdx)
1:      test    $ACTF_EVTCHN, %rdi
        jz      2f
        call    evtchn_collect
2:      test    $ACTF_EOI, %rdi
        jz      3f
        mov     $LAPIC_BASE, %edx
        movl    $0, LAPIC_EOI(%rdx)
3:      lock incq COUNTS(,%rbx,8)               # last: the host sees a finished handler
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        add     $16, %rsp                       # vector and error code
        iretq

# Xen 2-level guest handler on the page of the action at %rsi (docs/device-abi.md).
# Clobbers rax, rcx, r8-r11.
evtchn_collect:
        mov     ACT_EVTCHN_PAGE(%rsi), %r8
        mov     ACT_EVTCHN_UPCALL(%rsi), %r9
        and     $63, %r9
        shl     $4, %r9
        lea     EVT_UPCALLS(%r8,%r9), %r9       # upcall block: upcall_pending, selector
        movq    $0, (%r9)                       # clear upcall_pending first
        xor     %r10, %r10
        xchg    %r10, 8(%r9)                    # selector <- 0 (locked: full barrier)
4:      test    %r10, %r10
        jz      6f
        bsf     %r10, %r11                      # word w
        btr     %r11, %r10
5:      mov     EVT_PENDING(%r8,%r11,8), %rax
        mov     EVT_MASK(%r8,%r11,8), %rcx
        not     %rcx
        and     %rcx, %rax
        jz      4b
        bsf     %rax, %rcx                      # bit b
        lock btrq %rcx, EVT_PENDING(%r8,%r11,8)
        jnc     5b
        mov     %r11, %rax
        shl     $6, %rax
        add     %rcx, %rax                      # port = 64 w + b
        lock incl PORT_COUNTS(,%rax,4)
        jmp     5b
6:      ret

# Vectors 0..31: report through the mailbox and FAULT_PORT, then stay halted.
exception:
        mov     %rbx, MB_FAULT_VECTOR
        mov     88(%rsp), %rax
        mov     %rax, MB_FAULT_ERROR
        mov     96(%rsp), %rax
        mov     %rax, MB_FAULT_RIP
        mov     %cr2, %rax
        mov     %rax, MB_FAULT_CR2
        mov     $FAULT_PORT, %dx
        out     %al, %dx
1:      cli
        hlt
        jmp     1b

# ---- interrupt stubs: one per vector, 16 bytes apart ---------------------------------------------
        .macro STUB v
        .balign 16
        .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        .else
        pushq   $0                              # no CPU error code: push a dummy one
        .endif
        pushq   $\v
        jmp     isr_common
        .endm

        .balign 16
stubs:
        .altmacro
        .set    vec, 0
        .rept   256
        STUB    %vec
        .set    vec, vec + 1
        .endr
        .balign 16
stubs_end:
