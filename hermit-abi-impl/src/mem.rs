//! `sys_malloc` and friends: the kernel's heap (the global allocator, whose
//! free-page hints live migration uses), so std's `System` allocator and
//! Rust's `alloc` share one heap.

use alloc::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};

fn layout(size: usize, align: usize) -> Option<Layout> {
    (size > 0)
        .then(|| Layout::from_size_align(size, align).ok())
        .flatten()
}

#[no_mangle]
pub extern "C" fn sys_malloc(size: usize, align: usize) -> *mut u8 {
    let _kernel = crate::preempt::kernel_section();
    // SAFETY: the layout has a non-zero size.
    layout(size, align).map_or(core::ptr::null_mut(), |l| unsafe { alloc(l) })
}

#[no_mangle]
pub extern "C" fn sys_alloc(size: usize, align: usize) -> *mut u8 {
    let _kernel = crate::preempt::kernel_section();
    sys_malloc(size, align)
}

#[no_mangle]
pub extern "C" fn sys_alloc_zeroed(size: usize, align: usize) -> *mut u8 {
    let _kernel = crate::preempt::kernel_section();
    // SAFETY: the layout has a non-zero size.
    layout(size, align).map_or(core::ptr::null_mut(), |l| unsafe { alloc_zeroed(l) })
}

/// # Safety
/// `ptr` was allocated here with `size` and `align`.
#[no_mangle]
pub unsafe extern "C" fn sys_realloc(
    ptr: *mut u8,
    size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    let _kernel = crate::preempt::kernel_section();
    match layout(size, align) {
        // SAFETY: the caller's guarantees; `new_size` > 0 is checked.
        Some(l) if new_size > 0 && !ptr.is_null() => unsafe { realloc(ptr, l, new_size) },
        _ => core::ptr::null_mut(),
    }
}

/// # Safety
/// `ptr` was allocated here with `size` and `align`.
#[no_mangle]
pub unsafe extern "C" fn sys_free(ptr: *mut u8, size: usize, align: usize) {
    let _kernel = crate::preempt::kernel_section();
    if let (Some(l), false) = (layout(size, align), ptr.is_null()) {
        // SAFETY: the caller's guarantees.
        unsafe { dealloc(ptr, l) }
    }
}

/// # Safety
/// As [`sys_free`].
#[no_mangle]
pub unsafe extern "C" fn sys_dealloc(ptr: *mut u8, size: usize, align: usize) {
    let _kernel = crate::preempt::kernel_section();
    // SAFETY: the caller's guarantees.
    unsafe { sys_free(ptr, size, align) }
}
