//! The heap: all RAM from the end of the image to the end of guest memory,
//! managed by `linked_list_allocator` behind a spin lock.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __image_end: u8;
}

/// Hands `[end of image, mem_size)` to the allocator.
pub(crate) fn init(mem_size: u64) {
    let start = core::ptr::addr_of!(__image_end) as u64;
    if mem_size > start {
        // SAFETY: the range is RAM that nothing else uses (abi::layout: the
        // heap follows the image), and `init` runs once, before any allocation.
        unsafe {
            HEAP.lock()
                .init(start as *mut u8, (mem_size - start) as usize)
        };
    }
}

/// `(used, free)` bytes of the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
