//! The heap: all RAM from the end of the image to the end of guest memory
//! (or to a checkpoint blob the monitor placed there), managed by
//! `linked_list_allocator` behind a spin lock.
//!
//! It also keeps free-page hints for live migration: live bytes per heap
//! page, published through `BootInfo::page_use_addr` so the host can leave
//! pages that hold no live data behind (abi::boot::heap_page_is_free).
//!
//! Zeroed allocations do not write to heap memory nothing has written yet:
//! guest RAM starts as zeros and the host backs a page only once it is
//! touched, so an idle app's buffers (socket rings, virtio buffers) cost the
//! host nothing until they carry data. The heap remembers how far anything
//! may have written ([`Heap::dirty_end`]) and zeroes only below that.
//!
//! Small blocks (up to [`SMALL_MAX`] bytes) that are freed go to a bounded
//! free list per 16-byte size class ([`SmallBlocks`]) and are handed out
//! again from there: a request's short-lived buffers (kv's parsed
//! arguments) then cost no walk of the allocator's list of holes, which
//! grows with every long-lived allocation between them.

use abi::boot::BootInfo;
use abi::layout::{BOOT_INFO_ADDR, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use linked_list_allocator::LockedHeap;

use crate::arch::x86_64::mmio;

/// The allocator, with per-page accounting around it.
struct Heap {
    /// Freed small blocks, handed out before `inner` is asked.
    small: spin::Mutex<SmallBlocks>,
    inner: LockedHeap,
    /// `[u16; pages]`: live bytes per heap page; null until published.
    page_use: AtomicPtr<u16>,
    start: AtomicU64,
    pages: AtomicU64,
    /// Mirror of `BootInfo::page_use_seq`.
    seq: AtomicU64,
    /// Every heap byte at or above this address is still zero: no
    /// allocation has reached it, nor has the allocator's bookkeeping.
    dirty_end: AtomicU64,
}

/// Bytes past the end of the highest allocation that the allocator may have
/// written: the rounding of a block's size (to 16 bytes) and the header of
/// the free block that follows it (two words), with room to spare.
const BOOKKEEPING_SLACK: u64 = 64;

/// Largest block size served from the per-class free lists.
const SMALL_MAX: usize = 512;
/// Size classes: 16, 32, ... [`SMALL_MAX`] bytes.
const SMALL_CLASS: usize = 16;
const SMALL_CLASSES: usize = SMALL_MAX / SMALL_CLASS;
/// Blocks each class keeps at most; more go back to the allocator, so the
/// lists hold at most 64 x (16 + 32 + ... + 512) bytes = 528 KiB.
const SMALL_KEEP: u16 = 64;

/// Freed small blocks by size class: singly linked through their first
/// word. They stay counted as live in the page hints (they hold a link).
struct SmallBlocks {
    heads: [usize; SMALL_CLASSES],
    counts: [u16; SMALL_CLASSES],
}

/// The size class of `layout`, if it is small enough for the lists.
fn small_class(layout: Layout) -> Option<usize> {
    (layout.size() <= SMALL_MAX && layout.align() <= SMALL_CLASS)
        .then(|| layout.size().max(1).div_ceil(SMALL_CLASS) - 1)
}

/// The layout every block of `class` is allocated with.
fn class_layout(class: usize) -> Layout {
    // Sizes 16..=512, alignment 16: always a valid layout.
    Layout::from_size_align((class + 1) * SMALL_CLASS, SMALL_CLASS).unwrap_or(Layout::new::<u8>())
}

#[global_allocator]
static HEAP: Heap = Heap {
    small: spin::Mutex::new(SmallBlocks {
        heads: [0; SMALL_CLASSES],
        counts: [0; SMALL_CLASSES],
    }),
    inner: LockedHeap::empty(),
    page_use: AtomicPtr::new(core::ptr::null_mut()),
    start: AtomicU64::new(0),
    pages: AtomicU64::new(0),
    seq: AtomicU64::new(0),
    dirty_end: AtomicU64::new(0),
};

impl Heap {
    /// Bumps `BootInfo::page_use_seq`: odd before the allocator touches the
    /// heap, even again once the usage array agrees with it.
    fn bump_seq(&self) {
        if self.page_use.load(Ordering::Relaxed).is_null() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let field = BOOT_INFO_ADDR + core::mem::offset_of!(BootInfo, page_use_seq) as u64;
        mmio::write_u64(field, seq);
    }

    /// Adds `delta` (+/-) live bytes to every page `[addr, addr + len)` touches.
    fn account(&self, addr: u64, len: u64, add: bool) {
        let table = self.page_use.load(Ordering::Relaxed);
        if table.is_null() || len == 0 {
            return;
        }
        let (start, pages) = (
            self.start.load(Ordering::Relaxed),
            self.pages.load(Ordering::Relaxed),
        );
        let end = addr + len;
        let mut page_addr = addr & !(PAGE_SIZE - 1);
        while page_addr < end {
            let overlap = end.min(page_addr + PAGE_SIZE) - addr.max(page_addr);
            if let Some(i) = page_addr
                .checked_sub(start)
                .map(|o| o / PAGE_SIZE)
                .filter(|&i| i < pages)
            {
                // SAFETY: `table` has `pages` entries (published by `init`),
                // `i < pages`, and with one vCPU nothing writes it concurrently.
                unsafe {
                    let slot = table.add(i as usize);
                    *slot = if add {
                        (*slot).wrapping_add(overlap as u16)
                    } else {
                        (*slot).wrapping_sub(overlap as u16)
                    };
                }
            }
            page_addr += PAGE_SIZE;
        }
    }
}

// SAFETY: allocation is `LockedHeap`'s; this layer only counts bytes.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = small_class(layout) else {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { self.alloc_block(layout) };
        };
        {
            let mut small = self.small.lock();
            let head = small.heads[class];
            if head != 0 {
                // SAFETY: `head` is a block of this class on the list
                // (`dealloc`), at least 16 bytes, aligned; its first word
                // links the next one.
                small.heads[class] = unsafe { (head as *const usize).read() };
                small.counts[class] -= 1;
                return head as *mut u8;
            }
        }
        // SAFETY: a valid, non-zero-sized layout.
        unsafe { self.alloc_block(class_layout(class)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // The mark before this allocation moves it. One vCPU and no
        // preemption inside the allocator: nothing else moves it meanwhile.
        // A block from the small lists lies below the mark: zeroed whole.
        let dirty = self.dirty_end.load(Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { self.alloc(layout) };
        if ptr.is_null() {
            return ptr;
        }
        let (start, len) = (ptr as u64, layout.size() as u64);
        let end = start + len;
        let stale = dirty.clamp(start, end) - start;
        // SAFETY: `[ptr, ptr + stale)` lies inside the block just allocated.
        unsafe { core::ptr::write_bytes(ptr, 0, stale as usize) };
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = small_class(layout) else {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { self.dealloc_block(ptr, layout) };
        };
        {
            let mut small = self.small.lock();
            if small.counts[class] < SMALL_KEEP {
                // SAFETY: the block was allocated with `class_layout(class)`
                // (16-aligned, at least 16 bytes) and is the caller's no more.
                unsafe { (ptr as *mut usize).write(small.heads[class]) };
                small.heads[class] = ptr as usize;
                small.counts[class] += 1;
                return;
            }
        }
        // SAFETY: allocated from `inner` with this layout (`alloc`).
        unsafe { self.dealloc_block(ptr, class_layout(class)) }
    }
}

impl Heap {
    /// A block from the allocator, counted in the page hints.
    ///
    /// # Safety
    /// As [`GlobalAlloc::alloc`].
    unsafe fn alloc_block(&self, layout: Layout) -> *mut u8 {
        self.bump_seq();
        // SAFETY: forwarded with the caller's guarantees.
        let ptr = unsafe { self.inner.alloc(layout) };
        if !ptr.is_null() {
            self.account(ptr as u64, layout.size() as u64, true);
            self.dirty_end.fetch_max(
                ptr as u64 + layout.size() as u64 + BOOKKEEPING_SLACK,
                Ordering::Relaxed,
            );
        }
        self.bump_seq();
        ptr
    }

    /// Returns a block to the allocator.
    ///
    /// # Safety
    /// As [`GlobalAlloc::dealloc`], for a block of [`Self::alloc_block`].
    unsafe fn dealloc_block(&self, ptr: *mut u8, layout: Layout) {
        self.bump_seq();
        self.account(ptr as u64, layout.size() as u64, false);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.dealloc(ptr, layout) };
        self.bump_seq();
    }
}

extern "C" {
    static __image_end: u8;
}

/// Hands `[end of image, end)` to the allocator, where `end` is the end of
/// RAM or the start of a checkpoint blob the monitor placed after the image,
/// then publishes the free-page hints.
pub(crate) fn init(info: &BootInfo) {
    let start = image_end();
    let end = crate::checkpoint::restore_range(info, start).map_or(info.mem_size, |(blob, _)| blob);
    if end <= start {
        return;
    }
    // SAFETY: the range is RAM that nothing else uses (abi::layout: the
    // heap follows the image; a restore blob lies above `end`), and `init`
    // runs once, before any allocation.
    unsafe {
        HEAP.inner
            .lock()
            .init(start as *mut u8, (end - start) as usize)
    };
    // The monitor hands over fresh, zeroed RAM (the image's bss included);
    // the allocator has just written the header of its one free block.
    HEAP.dirty_end
        .store(start + BOOKKEEPING_SLACK, Ordering::Relaxed);

    let pages = (end - start) / PAGE_SIZE;
    let table: &'static mut [u16] = alloc::vec![0u16; pages as usize].leak();
    HEAP.start.store(start, Ordering::Relaxed);
    HEAP.pages.store(pages, Ordering::Relaxed);
    HEAP.page_use.store(table.as_mut_ptr(), Ordering::Release);
    // The table itself is live data (it was allocated before counting began).
    HEAP.account(table.as_ptr() as u64, (table.len() * 2) as u64, true);
    let field = |offset: usize| BOOT_INFO_ADDR + offset as u64;
    mmio::write_u64(field(core::mem::offset_of!(BootInfo, heap_start)), start);
    mmio::write_u64(field(core::mem::offset_of!(BootInfo, heap_pages)), pages);
    mmio::write_u64(
        field(core::mem::offset_of!(BootInfo, page_use_addr)),
        table.as_ptr() as u64,
    );
}

/// The first byte after the loaded image (page-aligned by the linker script).
pub(crate) fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// `(used, free)` bytes of the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.inner.lock();
    (heap.used(), heap.free())
}
