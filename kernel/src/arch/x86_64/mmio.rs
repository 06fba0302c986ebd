//! Volatile access to guest-physical memory the host also reads: the
//! doorbell page, the boot information block, the kvmclock page, the APICs.

/// Writes `value` to the 8-byte MMIO register at `addr`.
#[inline]
pub fn write_u64(addr: u64, value: u64) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // SAFETY: callers pass addresses of the device window or low tables,
    // which the page tables map (abi::layout); the access is aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) };
}

/// Writes `value` to the 4-byte MMIO register at `addr` (APIC registers).
#[inline]
pub fn write_u32(addr: u64, value: u32) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    // SAFETY: callers pass addresses of the mapped device range; aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) };
}

/// Reads a `T` at `addr` without tearing assumptions (volatile).
#[inline]
pub fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses of fixed, mapped, aligned structures of
    // the layout (abi::layout) that are valid for any bit pattern of `T`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Copies `bytes` to guest-physical `addr`.
pub fn write_bytes(addr: u64, bytes: &[u8]) {
    // SAFETY: callers pass a mapped region of the layout large enough for `bytes`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
}

/// A `'static` byte slice at a fixed guest-physical address.
pub fn slice(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: used for the command line at CMDLINE_ADDR, which nothing
    // writes after boot; the length was bounded by CMDLINE_MAX.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}
