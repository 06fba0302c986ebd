//! virtio-mmio devices for `virtio-drivers`, shared by every driver (the
//! network card in `net`, the checkpoint console in [`crate::checkpoint`]):
//! finding a device among the monitor's `virtio_mmio.device=` command-line
//! entries ([`probe`]) and DMA ([`UnikernelHal`]: guest memory is
//! identity-mapped, so a buffer's address is what the device sees; DMA pages
//! come from the heap). The drivers' MMIO works from ring 3 (an
//! MMIO access traps to the monitor whatever the privilege level).
//! Every transport is wrapped in [`abi::virtio::SpecTransport`], so devices
//! are initialised in the order the virtio spec sets (strict monitors such as
//! Firecracker refuse virtio-drivers' own order).

use abi::virtio::{InitCheck, SpecTransport};
use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::string::String;
use core::ptr::NonNull;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// A `virtio_mmio.device=` entry that is not `SIZE@BASE[:IRQ]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadDeviceSpec(pub String);

/// Parses Linux's `SIZE@BASE:IRQ` (`0x200@0xfeb00e00:12`, `4K@0xc0001000:5`).
pub fn parse_spec(spec: &str) -> Option<(u64, u64)> {
    fn number(s: &str) -> Option<u64> {
        let (digits, scale) = match s.as_bytes().last()? {
            b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
            b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
            _ => (s, 1),
        };
        let v = match digits
            .strip_prefix("0x")
            .or_else(|| digits.strip_prefix("0X"))
        {
            Some(hex) => u64::from_str_radix(hex, 16).ok()?,
            None => digits.parse().ok()?,
        };
        v.checked_mul(scale)
    }
    let (size, rest) = spec.split_once('@')?;
    let base = rest.split(':').next()?;
    Some((number(size)?, number(base)?))
}

/// The transport every driver of the guest uses.
pub type GuestTransport = SpecTransport<MmioTransport<'static>>;

/// The interrupt line of a `SIZE@BASE:IRQ` spec, if it names one.
pub fn parse_irq(spec: &str) -> Option<u32> {
    spec.rsplit_once(':')?.1.parse().ok()
}

/// A device found by [`probe`].
pub struct Probed {
    pub transport: GuestTransport,
    /// To check once a driver has initialised the device.
    pub check: InitCheck,
    /// Its interrupt line, if the command line names one.
    pub irq: Option<u32>,
}

/// The transport of the first virtio-mmio device of type `ty` named on the
/// command line, if any (windows that hold no valid device are skipped).
pub fn probe(ty: DeviceType) -> Result<Option<Probed>, BadDeviceSpec> {
    for spec in &crate::cmdline::get().virtio_mmio {
        let bad = || BadDeviceSpec(spec.clone());
        let (size, base) = parse_spec(spec).ok_or_else(bad)?;
        let header = NonNull::new(base as *mut VirtIOHeader).ok_or_else(bad)?;
        // SAFETY: the monitor named this MMIO window on the command line;
        // the page tables map it (abi::x86), and each device is probed for
        // by one driver only.
        let transport = match unsafe { MmioTransport::new(header, size as usize) } {
            Ok(t) => t,
            Err(e) => {
                log::warn!("virtio-mmio window {spec}: {e}");
                continue;
            }
        };
        if transport.device_type() == ty {
            let (transport, check) = SpecTransport::new(transport);
            return Ok(Some(Probed {
                transport,
                check,
                irq: parse_irq(spec),
            }));
        }
    }
    Ok(None)
}

/// The `Hal` of our unikernel.
pub struct UnikernelHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned, exclusively owned heap
// memory whose address is its physical address (identity map); `share`
// returns the buffer's own address for the same reason.
unsafe impl Hal for UnikernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (virtio-drivers asks for >= 1 page).
        let ptr = unsafe { alloc_zeroed(layout(pages)) };
        let ptr = NonNull::new(ptr).expect("out of memory for virtio DMA");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller passes back what `dma_alloc` returned for `pages`.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
