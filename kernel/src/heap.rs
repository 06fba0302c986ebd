//! The heap: all RAM from the end of the image to the end of guest memory,
//! managed by `linked_list_allocator` behind a spin lock.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __image_end: u8;
}

/// Hands `[end of image, mem_size)` to the allocator.
/// Hands `[end of image, end)` to the allocator, where `end` is the end of
/// RAM or the start of a checkpoint blob the monitor placed after the image.
pub(crate) fn init(info: &abi::boot::BootInfo) {
    let start = image_end();
    let end = crate::checkpoint::restore_range(info, start).map_or(info.mem_size, |(blob, _)| blob);
    if end > start {
        // SAFETY: the range is RAM that nothing else uses (abi::layout: the
        // heap follows the image; a restore blob lies above `end`), and
        // `init` runs once, before any allocation.
        unsafe { HEAP.lock().init(start as *mut u8, (end - start) as usize) };
    }
}

/// The first byte after the loaded image.
pub(crate) fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// `(used, free)` bytes of the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
