/*
 * squib's test guest: a tiny x86-64 kernel whose only job is to be a hard
 * thing to snapshot.
 *
 * Why it looks like this:
 *  - It boots by Linux's 64-bit boot protocol (entered in long mode at the ELF
 *    entry with paging on, interrupts off, and the boot_params "zero page" in
 *    rsi), so the VMM path that loads it is the path that loads a vmlinux.
 *  - Its clock is a real interrupt: PIT channel 0 at 100 Hz through the 8259
 *    PIC and the local APIC's LINT0 (ExtINT), all of them KVM's in-kernel
 *    models. Every 10th tick the handler prints one `COUNTER n` line on COM1.
 *    A snapshot that loses PIT, PIC, LAPIC or vCPU-event state stops the
 *    counter; one that loses memory or registers breaks the checksum.
 *  - Its steady state runs in 64-bit user mode (CPL3). On a nested PVM host
 *    CPL0 code is emulated one instruction at a time, CPL3 code runs natively,
 *    so CPL0 does setup and a few dozen instructions per tick, nothing more.
 *    It avoids cmpxchg16b, xrstor and int3, where that emulator stops.
 *  - Work, per CPU: random 64-bit additions into a 1 MiB region while keeping
 *    a running sum of the region; after every batch the CPU re-sums the whole
 *    region and compares. `ok` counts agreements, `bad` disagreements, `back`
 *    counts reads of the TSC that went backwards. A restore that drops a dirty
 *    page, or makes time run backwards, shows up as `bad` or `back` > 0.
 *
 * Output (one line every 100 ms, from the timer interrupt on CPU 0):
 *   COUNTER <n> ck0=<16 hex> ok0=<dec> bad0=<dec> back0=<dec> [ck1=... for CPU 1]
 * `ck` is the region's sum as of that CPU's last successful re-check.
 *
 * Application processors start as on a PC: they wait for INIT/SIPI. CPU 0
 * copies a real-mode trampoline to 0x10000, switches its local APIC to x2APIC
 * mode and sends INIT, SIPI, SIPI to each other CPU (their count is CPUID leaf
 * 1, EBX[23:16]); the trampoline goes real mode -> protected mode -> long
 * mode and jumps to _start. A CPU tells who it is from its initial APIC ID
 * (CPUID leaf 1, EBX[31:24]).
 *
 * Ports: 0x3f8 COM1 (output only, THR never polled: the VMM's 8250 is always
 * ready), 0x20/0x21/0xa0/0xa1 PIC, 0x40/0x43 PIT, 0x501 "guest panic": an
 * unexpected exception writes its vector there and the VMM stops.
 */
    .intel_syntax noprefix

    .set MAX_CPUS, 2
    .set KSTACK_SIZE, 0x4000
    .set USTACK_SIZE, 0x4000
    .set WORK_BASE, 0x400000          /* CPU n works on [WORK_BASE + n MiB, +1 MiB) */
    .set WORK_WORDS_MASK, 0x1ffff     /* 1 MiB / 8 - 1 */
    .set WORK_WORDS, 0x20000
    .set BATCH, 16384                 /* random updates between two re-checks */
    .set PANIC_PORT, 0x501
    .set COM1, 0x3f8
    .set PIT_DIVISOR, 11932           /* 1193182 Hz / 11932 = 100.0 Hz */
    .set TICKS_PER_LINE, 10
    .set TRAMPOLINE, 0x10000          /* SIPI vector 0x10 */
    .set MSR_APIC_BASE, 0x1b
    .set MSR_X2APIC_ICR, 0x830
    .set MSR_EFER, 0xc0000080

    .set KCODE, 0x08
    .set KDATA, 0x10
    .set UDATA, 0x18
    .set UCODE, 0x20
    .set TSS0,  0x28                  /* CPU n's TSS descriptor: TSS0 + 16 n */

    /* Per-CPU user-visible state (64 bytes each, at user_state). */
    .set ST_SUM, 0
    .set ST_OK, 8
    .set ST_BAD, 16
    .set ST_BACK, 24
    .set ST_LAST_TSC, 32
    .set ST_VERIFIED, 40
    .set ST_ONLINE, 48
    .set ST_SIZE, 64

/* ------------------------------------------------------------------------ */
    .text
    .globl _start
_start:
    cli
    mov r15, rsi                      /* zero page (CPU 0 only) */
    mov eax, 1
    cpuid
    shr ebx, 24                       /* initial APIC ID = CPU index */
    mov r14, rbx
    cmp r14, MAX_CPUS
    jae halt_forever
    /* Own kernel stack: the VMM's boot stack is shared by every vCPU. */
    mov rax, r14
    inc rax
    shl rax, 14                       /* (cpu + 1) * KSTACK_SIZE */
    lea rsp, [rip + kstacks]
    add rsp, rax
    test r14, r14
    jnz ap_wait

    /* ---- CPU 0: tables shared by every CPU ---- */
    call build_page_tables
    call build_idt
    call patch_tss_descriptors
    call banner
    call init_pic
    call init_pit
    mov byte ptr [rip + tables_ready], 1
    call start_aps
    jmp cpu_common

ap_wait:
    pause
    cmp byte ptr [rip + tables_ready], 0
    je ap_wait

cpu_common:
    lea rax, [rip + pml4]
    mov cr3, rax
    lgdt [rip + gdt_ptr]
    lidt [rip + idt_ptr]
    mov ax, KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    /* Reload CS with a far return. */
    push KCODE
    lea rax, [rip + 1f]
    push rax
    retfq
1:
    /* This CPU's TSS: RSP0 = top of its kernel stack. */
    mov rax, r14
    imul rax, rax, 104
    lea rdi, [rip + tss]
    add rdi, rax
    mov [rdi + 4], rsp
    mov ax, r14w
    shl ax, 4
    add ax, TSS0
    ltr ax

    /* Announce the CPU in its user state block. */
    mov rax, r14
    shl rax, 6
    lea rbx, [rip + user_state]
    mov qword ptr [rbx + rax + ST_ONLINE], 1

    /* Drop to CPL3 at user_main(rdi = cpu) with interrupts on. */
    mov rax, r14
    inc rax
    shl rax, 14
    lea rcx, [rip + ustacks]
    add rcx, rax
    mov rdi, r14
    push UDATA | 3                    /* ss */
    push rcx                          /* rsp */
    push 0x202                        /* rflags: IF */
    push UCODE | 3                    /* cs */
    lea rax, [rip + user_main]
    push rax                          /* rip */
    iretq

halt_forever:
    cli
    hlt
    jmp halt_forever

/* Wake CPUs 1..count-1: trampoline to TRAMPOLINE, then INIT, SIPI, SIPI. */
start_aps:
    mov eax, 1
    cpuid
    shr ebx, 16
    and ebx, 0xff                     /* logical CPUs */
    cmp ebx, MAX_CPUS
    jbe 1f
    mov ebx, MAX_CPUS
1:  cmp ebx, 1
    jbe 9f
    lea rsi, [rip + trampoline_start]
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline_start
2:  mov al, [rsi]
    mov [rdi], al
    inc rsi
    inc rdi
    dec ecx
    jnz 2b
    /* x2APIC mode: the ICR is one MSR write, no MMIO mapping needed. */
    mov ecx, MSR_APIC_BASE
    rdmsr
    or eax, 0xc00                     /* EN | EXTD */
    wrmsr
    mov r8d, 1                        /* APIC ID */
3:  mov ecx, MSR_X2APIC_ICR
    mov edx, r8d
    mov eax, 0x4500                   /* INIT, assert */
    wrmsr
    mov eax, 0x4600 | (TRAMPOLINE >> 12)   /* STARTUP */
    wrmsr
    wrmsr
    inc r8d
    cmp r8d, ebx
    jb 3b
9:  ret

/* Real mode at TRAMPOLINE (CS = 0x1000, IP = 0): position-independent by
 * construction, every address below is TRAMPOLINE + offset. */
    .code16
trampoline_start:
    cli
    mov ax, cs
    mov ds, ax
    lgdt [tramp_gdtr - trampoline_start]
    mov eax, cr0
    or eax, 1                         /* PE */
    mov cr0, eax
    .byte 0x66, 0xea                  /* ljmp 0x08:TRAMPOLINE + (tramp32 - trampoline_start) */
    .long TRAMPOLINE + tramp32 - trampoline_start
    .word 0x08
    .code32
tramp32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x20                      /* PAE */
    mov cr4, eax
    mov eax, offset pml4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, 0x100                     /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001                /* PG | PE */
    mov cr0, eax
    .byte 0xea                        /* ljmp 0x18:_start */
    .long _start
    .word 0x18
    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff          /* 0x08 32-bit code */
    .quad 0x00cf92000000ffff          /* 0x10 data */
    .quad 0x00af9a000000ffff          /* 0x18 64-bit code */
tramp_gdtr:
    .word 31
    .long TRAMPOLINE + tramp_gdt - trampoline_start
trampoline_end:
    .code64

/* Identity-map the first 1 GiB with 2 MiB pages; the first page is
 * supervisor-only (kernel), the rest user-accessible (user code, work). */
build_page_tables:
    lea rdi, [rip + pd]
    mov rax, 0x83                     /* P | RW | PS */
    mov [rdi], rax
    mov rax, 0x200087                 /* 2 MiB | P | RW | US | PS */
    mov ecx, 511
1:  add rdi, 8
    mov [rdi], rax
    add rax, 0x200000
    dec ecx
    jnz 1b
    lea rax, [rip + pd]
    or rax, 0x7                       /* P | RW | US */
    mov [rip + pdpt], rax
    lea rax, [rip + pdpt]
    or rax, 0x7
    mov [rip + pml4], rax
    ret

/* Gates 0-47: exceptions, the timer (32) and the other PIC lines. */
build_idt:
    lea rdi, [rip + idt]
    lea rsi, [rip + isr_table]
    mov ecx, 48
    movabs r8, 0x00008e0000080000     /* present, DPL0, interrupt gate, selector KCODE */
1:  mov rax, [rsi]
    mov rdx, rax
    and edx, 0xffff
    or rdx, r8
    mov r9, rax
    shr r9, 16
    and r9, 0xffff
    shl r9, 48
    or rdx, r9
    mov [rdi], rdx
    shr rax, 32
    mov [rdi + 8], rax
    add rdi, 16
    add rsi, 8
    dec ecx
    jnz 1b
    ret

/* Write each CPU's TSS base into its 16-byte descriptor. */
patch_tss_descriptors:
    xor ecx, ecx
1:  lea rax, [rip + tss]
    imul rdx, rcx, 104
    add rax, rdx                      /* base */
    lea rdi, [rip + gdt_tss]
    mov rdx, rcx
    shl rdx, 4
    add rdi, rdx
    mov rdx, rax
    and edx, 0xffffff
    shl rdx, 16
    or rdx, 103                       /* limit */
    movabs r8, 0x0000890000000000     /* present, 64-bit TSS (available) */
    or rdx, r8
    mov r8, rax
    shr r8, 24
    and r8, 0xff
    shl r8, 56
    or rdx, r8
    mov [rdi], rdx
    shr rax, 32
    mov [rdi + 8], rax
    /* No I/O bitmap: user mode port I/O faults. */
    lea rax, [rip + tss]
    imul rdx, rcx, 104
    mov word ptr [rax + rdx + 102], 104
    inc ecx
    cmp ecx, MAX_CPUS
    jb 1b
    ret

/* "squib guest: e820=<n> cmdline=<...>" from the zero page. */
banner:
    lea rsi, [rip + s_banner]
    call puts
    movzx eax, byte ptr [r15 + 0x1e8]  /* boot_params.e820_entries */
    call putdec
    lea rsi, [rip + s_ram]
    call puts
    /* Sum of the lengths of the e820 RAM (type 1) entries, in MiB. */
    movzx ecx, byte ptr [r15 + 0x1e8]
    lea rdi, [r15 + 0x2d0]             /* boot_params.e820_table, 20 bytes each */
    xor edx, edx
1:  test ecx, ecx
    jz 2f
    cmp dword ptr [rdi + 16], 1
    jne 3f
    add rdx, [rdi + 8]
3:  add rdi, 20
    dec ecx
    jmp 1b
2:  mov rax, rdx
    shr rax, 20
    call putdec
    lea rsi, [rip + s_cmdline]
    call puts
    mov esi, dword ptr [r15 + 0x228]   /* boot_params.hdr.cmd_line_ptr */
    test esi, esi
    jz 4f
    call puts
4:  mov al, 10
    call putc
    ret

/* 8259 pair: vectors 32-47, only IRQ0 (PIT) unmasked. */
init_pic:
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 32
    out 0x21, al
    mov al, 40
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    ret

/* PIT channel 0, rate generator (mode 2), 100 Hz. */
init_pit:
    mov al, 0x34
    out 0x43, al
    mov ax, PIT_DIVISOR
    out 0x40, al
    mov al, ah
    out 0x40, al
    ret

/* ---- output (CPL0) ------------------------------------------------------ */

/* al = byte */
putc:
    push rdx
    mov dx, COM1
    out dx, al
    pop rdx
    ret

/* rsi = NUL-terminated string */
puts:
    push rax
1:  mov al, [rsi]
    test al, al
    jz 2f
    call putc
    inc rsi
    jmp 1b
2:  pop rax
    ret

/* rax = value, 16 hex digits */
puthex:
    push rbx
    push rcx
    push rdx
    mov rbx, rax
    mov ecx, 16
    lea rdx, [rip + hexdigits]
1:  rol rbx, 4
    mov eax, ebx
    and eax, 0xf
    mov al, [rdx + rax]
    call putc
    dec ecx
    jnz 1b
    pop rdx
    pop rcx
    pop rbx
    ret

/* rax = value, decimal */
putdec:
    push rbx
    push rcx
    push rdx
    sub rsp, 32
    lea rbx, [rsp + 31]
    mov byte ptr [rbx], 0
    mov ecx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rbx
    mov [rbx], dl
    test rax, rax
    jnz 1b
    mov rsi, rbx
    call puts
    add rsp, 32
    pop rdx
    pop rcx
    pop rbx
    ret

/* ---- interrupts --------------------------------------------------------- */

/* Vector 32: PIT tick. Prints a line every TICKS_PER_LINE ticks. */
timer_isr:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    dec dword ptr [rip + tick_countdown]
    jnz 9f
    mov dword ptr [rip + tick_countdown], TICKS_PER_LINE
    inc qword ptr [rip + counter]
    lea rsi, [rip + s_counter]
    call puts
    mov rax, [rip + counter]
    call putdec
    xor edi, edi                      /* cpu */
    lea rbx, [rip + user_state]
1:  cmp qword ptr [rbx + ST_ONLINE], 0
    je 2f
    lea rsi, [rip + s_ck]
    call puts_cpu
    mov rax, [rbx + ST_VERIFIED]
    call puthex
    lea rsi, [rip + s_ok]
    call puts_cpu
    mov rax, [rbx + ST_OK]
    call putdec
    lea rsi, [rip + s_bad]
    call puts_cpu
    mov rax, [rbx + ST_BAD]
    call putdec
    lea rsi, [rip + s_back]
    call puts_cpu
    mov rax, [rbx + ST_BACK]
    call putdec
2:  add rbx, ST_SIZE
    inc edi
    cmp edi, MAX_CPUS
    jb 1b
    mov al, 10
    call putc
9:  mov al, 0x20                      /* EOI to the master PIC */
    out 0x20, al
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    iretq

/* rsi = label, edi = cpu: prints "<label><cpu>=" */
puts_cpu:
    call puts
    mov al, dil
    add al, '0'
    call putc
    mov al, '='
    call putc
    ret

/* Vectors 33-47: other PIC lines (all masked) and spurious IRQs. */
irq_other:
    push rax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    pop rax
    iretq

/* Exceptions: print vector, error code and rip, tell the VMM, stop. */
exc_common:
    lea rsi, [rip + s_exc]
    call puts
    mov rax, [rsp]
    call putdec
    lea rsi, [rip + s_err]
    call puts
    mov rax, [rsp + 8]
    call puthex
    lea rsi, [rip + s_rip]
    call puts
    mov rax, [rsp + 16]
    call puthex
    mov al, 10
    call putc
    mov rax, [rsp]
    mov dx, PANIC_PORT
    out dx, al
    jmp halt_forever

    .macro EXC_STUB v
exc_stub_\v:
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    push 0
    .endif
    push \v
    jmp exc_common
    .endm

    .altmacro
    .set vec, 0
    .rept 32
    EXC_STUB %vec
    .set vec, vec + 1
    .endr

/* ------------------------------------------------------------------------ */
    .section .rodata
    .macro EXC_ENTRY v
    .quad exc_stub_\v
    .endm
    .balign 8
isr_table:
    .set vec, 0
    .rept 32
    EXC_ENTRY %vec
    .set vec, vec + 1
    .endr
    .quad timer_isr
    .rept 15
    .quad irq_other
    .endr
    .noaltmacro

hexdigits:  .ascii "0123456789abcdef"
s_banner:   .asciz "squib guest: e820="
s_ram:      .asciz " ram_mib="
s_cmdline:  .asciz " cmdline="
s_counter:  .asciz "COUNTER "
s_ck:       .asciz " ck"
s_ok:       .asciz " ok"
s_bad:      .asciz " bad"
s_back:     .asciz " back"
s_exc:      .asciz "EXCEPTION vector="
s_err:      .asciz " error="
s_rip:      .asciz " rip="

    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff          /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff          /* 0x10 kernel data */
    .quad 0x00cff2000000ffff          /* 0x18 user data, DPL3 */
    .quad 0x00affa000000ffff          /* 0x20 user code, 64-bit, DPL3 */
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0          /* 0x28 + 16 n: TSS of CPU n, filled at boot */
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0, 0, 0
idt_ptr:
    .word 48 * 16 - 1
    .quad idt
tick_countdown:
    .long TICKS_PER_LINE
    .balign 8
counter:
    .quad 0
tables_ready:
    .byte 0

    .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
idt:    .skip 48 * 16
    .balign 16
tss:    .skip MAX_CPUS * 104
    .balign 16
kstacks: .skip MAX_CPUS * KSTACK_SIZE

/* ---- user mode (CPL3) --------------------------------------------------- */
    .section .user_text, "ax"
/* rdi = cpu. Never returns, never makes a system call. */
user_main:
    mov rbx, rdi
    shl rbx, 6
    lea rax, [rip + user_state]
    add rbx, rax                      /* rbx = this CPU's state */
    mov r12, rdi
    shl r12, 20
    add r12, WORK_BASE                /* r12 = this CPU's region */
    movabs r13, 0x9e3779b97f4a7c15
    lea rax, [rdi + 1]
    imul r13, rax                     /* xorshift state, per CPU, never zero */
1:  mov ecx, BATCH
2:  mov rax, r13                      /* xorshift64 */
    shl rax, 13
    xor r13, rax
    mov rax, r13
    shr rax, 7
    xor r13, rax
    mov rax, r13
    shl rax, 17
    xor r13, rax
    mov rax, r13
    and eax, WORK_WORDS_MASK
    add [r12 + rax * 8], r13
    add [rbx + ST_SUM], r13
    dec ecx
    jnz 2b
    /* Re-check: the region's sum must equal the running sum. */
    xor edx, edx
    xor ecx, ecx
3:  add rdx, [r12 + rcx * 8]
    inc ecx
    cmp ecx, WORK_WORDS
    jb 3b
    cmp rdx, [rbx + ST_SUM]
    jne 4f
    mov [rbx + ST_VERIFIED], rdx
    inc qword ptr [rbx + ST_OK]
    jmp 5f
4:  inc qword ptr [rbx + ST_BAD]
    mov rdx, [rbx + ST_SUM]           /* carry on from what the region holds */
    xor edx, edx
    xor ecx, ecx
6:  add rdx, [r12 + rcx * 8]
    inc ecx
    cmp ecx, WORK_WORDS
    jb 6b
    mov [rbx + ST_SUM], rdx
5:  /* Time must never run backwards, across a restore included. */
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, [rbx + ST_LAST_TSC]
    jae 7f
    inc qword ptr [rbx + ST_BACK]
7:  mov [rbx + ST_LAST_TSC], rax
    jmp 1b

    .section .user_data, "aw"
    .balign 64
user_state:
    .fill MAX_CPUS * ST_SIZE, 1, 0

    .section .user_bss, "aw", @nobits
    .balign 4096
ustacks: .skip MAX_CPUS * USTACK_SIZE
