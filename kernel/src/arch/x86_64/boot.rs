//! Entry points and the image's ELF notes.
//!
//! - `_user_entry` (64-bit, ring 3): where our shim starts the vCPU, with the
//!   CPU tables already written and `rdi` = `BootInfo`, `rsp` = stack top.
//! - `_pvh_entry` (32-bit, ring 0, paging off; `ebx` = `hvm_start_info`):
//!   where PVH monitors (QEMU microvm, Firecracker) start. It enters long
//!   mode on static boot tables and calls [`super::pvh::pvh_main`], which
//!   writes the same CPU tables our shim writes and drops to `_user_entry`.
//!
//! One `PT_NOTE` segment carries both notes (linux-loader reads only one).

use abi::ABI_VERSION;

core::arch::global_asm!(
    r#"
    .section .note.libcloud, "a", @note
    .p2align 2
    .long 4, 4, {xen_type}
    .asciz "Xen"
    .long _pvh_entry

    .p2align 2
    .long 9, 24, {lc_type}
    .asciz "LibCloud"
    .p2align 2
    .long {abi_version}, 0
    .quad _user_entry, trap_stubs
    .p2align 2

    .section .text.boot, "ax"
    .global _user_entry
_user_entry:
    xorl %ebp, %ebp
    call {kernel_main}
    ud2

    .code32
    .global _pvh_entry
_pvh_entry:
    cli
    cld
    movl %ebx, %edi
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* CR4: PAE; OSFXSR, OSXMMEXCPT and, if CPUID offers it, FSGSBASE for
       std apps (as our shim sets them). cpuid clobbers ebx (saved in edi). */
    movl $0x620, %esi
    xorl %eax, %eax
    cpuid
    cmpl $7, %eax
    jb 1f
    movl $7, %eax
    xorl %ecx, %ecx
    cpuid
    testl $1, %ebx
    jz 1f
    orl $0x10000, %esi
1:
    movl %cr4, %eax
    orl %esi, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $_pvh_entry64

    .code64
_pvh_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp
    movl %edi, %edi
    xorl %ebp, %ebp
    call {pvh_main}
    ud2

    /* Boot-only tables: 1 GiB identity map in 2 MiB pages, flat GDT. */
    .section .data.boot, "aw"
    .p2align 12
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x3
    .fill 511, 8, 0
boot_pd:
    .set page, 0
    .rept 512
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_ptr:
    .word 23
    .quad boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 4
boot_stack:
    .fill 16384, 1, 0
boot_stack_top:
"#,
    xen_type = const abi::note::XEN_ELFNOTE_PHYS32_ENTRY,
    lc_type = const abi::note::NOTE_TYPE_IMAGE,
    abi_version = const ABI_VERSION,
    kernel_main = sym crate::start::kernel_main,
    pvh_main = sym super::pvh::pvh_main,
    options(att_syntax)
);
