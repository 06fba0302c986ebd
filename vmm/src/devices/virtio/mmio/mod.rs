//! The virtio-mmio v2 transport: the register file of one device window
//! (virtio 1.2 §4.2.2).
//!
//! ```text
//! 0x000 magic "virt"        0x004 version (2)         0x008 device id     0x00c vendor id
//! 0x010 device features     0x014 device features sel
//! 0x020 driver features     0x024 driver features sel
//! 0x030 queue sel           0x034 queue num max       0x038 queue num     0x044 queue ready
//! 0x050 queue notify        0x060 interrupt status    0x064 interrupt ack 0x070 status
//! 0x080/0x084 queue desc    0x090/0x094 queue avail   0x0a0/0x0a4 queue used
//! 0x0fc config generation   0x100.. device configuration space
//! ```
//!
//! Registers are 32-bit; other widths are refused (a warning, reads give 0).
//! Whatever a guest writes, the shim does not panic: bad values (a queue
//! size that is not a power of two or exceeds the maximum, misaligned or
//! out-of-RAM queue addresses, features that were not offered) are logged
//! and set `DEVICE_NEEDS_RESET`, and a device that needs a reset moves no
//! data until the driver resets it (status 0). A guest that breaks its
//! queues [`MAX_ERRORS`] times is stopped.

pub mod persist;

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{status, Progress, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::vm::GuestMemoryMmap;

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version we implement (virtio 1.x, not legacy).
pub const VERSION: u32 = 2;
/// Our vendor id ("LCLD").
pub const VENDOR_ID: u32 = 0x444c_434c;
/// Where device configuration space starts.
pub const CONFIG_OFFSET: u64 = 0x100;
/// How many broken queues a guest may cause before it is stopped.
pub const MAX_ERRORS: u32 = 8;

/// Interrupt status bits (nobody is interrupted: the guest may poll them).
const INT_USED_BUFFER: u32 = 1;
const INT_CONFIG_CHANGE: u32 = 2;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The register file of one virtio-mmio window and the device behind it.
pub struct MmioTransport {
    base: u64,
    size: u64,
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    /// Queue addresses as the driver wrote them (low, high halves).
    addrs: Vec<[u64; 3]>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    active: bool,
    errors: u32,
    /// Why the guest must be stopped, found on the network thread.
    fatal: Option<String>,
    /// The rate limit of the warnings the driver triggers.
    warnings: shim_util::limit::Warnings,
}

/// Who serves the device: the vCPU thread (after a notify of that queue,
/// or on `HC_YIELD`), or the network thread while the guest polls.
enum Caller {
    Vcpu(Option<u16>),
    Polled,
}

/// Which queue address register pair.
#[derive(Clone, Copy)]
enum Ring {
    Desc = 0,
    Avail = 1,
    Used = 2,
}

impl MmioTransport {
    /// A transport for `device` at guest-physical `base`, `size` bytes long.
    pub fn new(base: u64, size: u64, device: Box<dyn VirtioDevice>) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).unwrap_or_else(|_| {
                    // A device bug, not a guest's: a queue of 1 still works.
                    tracing::error!(device = device.name(), max, "bad queue max size");
                    Queue::new(1).expect("1 is a valid queue size")
                })
            })
            .collect();
        let addrs = vec![[0; 3]; queues.len()];
        Self {
            base,
            size,
            device,
            queues,
            addrs,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            active: false,
            errors: 0,
            fatal: None,
            warnings: Default::default(),
        }
    }

    /// Whether guest-physical `addr` lies in this window.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }

    /// Whether guest-physical `addr` is this window's `QueueNotify` register.
    pub fn is_notify(&self, addr: u64) -> bool {
        addr == self.base + reg::QUEUE_NOTIFY
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver brought the device up (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The queues (for tests and snapshots).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// See [`VirtioDevice::port`].
    pub fn port(&self) -> Option<std::sync::Arc<hostnet::port::GuestPort>> {
        self.device.port()
    }

    /// See [`VirtioDevice::wait_fd`].
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.device.wait_fd()
    }

    /// See [`VirtioDevice::prepare_wait`].
    pub fn prepare_wait(&mut self) {
        if self.active {
            self.device.prepare_wait();
        }
    }

    /// A guest read of `data.len()` bytes at `addr` (inside the window).
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr - self.base;
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                len = data.len(),
                offset = format_args!("{offset:#x}"),
                "register read ignored: registers are 32-bit"
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => self.addr_half(Ring::Desc, offset),
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => self.addr_half(Ring::Avail, offset),
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH => self.addr_half(Ring::Used, offset),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                shim_util::guest_warn!(
                    self.warnings,
                    device = self.device.name(),
                    offset = format_args!("{offset:#x}"),
                    "read of write-only or unknown register"
                );
                0
            }
        }
    }

    fn addr_half(&self, ring: Ring, offset: u64) -> u32 {
        let Some(addrs) = self.addrs.get(self.queue_sel as usize) else {
            return 0;
        };
        let value = addrs[ring as usize];
        if offset.is_multiple_of(8) {
            value as u32
        } else {
            (value >> 32) as u32
        }
    }

    /// A guest write of `data` at `addr` (inside the window). An error
    /// means the guest kept breaking the device and must be stopped.
    pub fn write(&mut self, mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<(), String> {
        let offset = addr - self.base;
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return Ok(());
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                len = data.len(),
                offset = format_args!("{offset:#x}"),
                "register write ignored: registers are 32-bit"
            );
            return Ok(());
        };
        if !offset.is_multiple_of(4) {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                offset = format_args!("{offset:#x}"),
                "unaligned register write ignored"
            );
            return Ok(());
        }
        self.write_register(mem, offset, u32::from_le_bytes(bytes))
    }

    fn write_register(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        value: u32,
    ) -> Result<(), String> {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.write_queue_num(value),
            reg::QUEUE_READY => self.write_queue_ready(mem, value),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                self.write_queue_addr(Ring::Desc, offset, value)
            }
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => {
                self.write_queue_addr(Ring::Avail, offset, value)
            }
            reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH => {
                self.write_queue_addr(Ring::Used, offset, value)
            }
            reg::QUEUE_NOTIFY => return self.notify(mem, value),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(mem, value),
            _ => shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                value = format_args!("{value:#x}"),
                offset = format_args!("{offset:#x}"),
                "write to read-only or unknown register ignored"
            ),
        }
        Ok(())
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                "driver features written after FEATURES_OK: ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel if value != 0 => shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                features = format_args!("{value:#x}"),
                word = sel,
                "driver features in a word which offers none"
            ),
            _ => {}
        }
    }

    /// The selected queue, if it may still be configured.
    fn configurable_queue(&mut self, what: &str) -> Option<usize> {
        let index = self.queue_sel as usize;
        if index >= self.queues.len() {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                write = what,
                queue = index,
                "write to a queue which does not exist: ignored"
            );
            return None;
        }
        if self.active {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                write = what,
                queue = index,
                "queue write after DRIVER_OK: ignored"
            );
            return None;
        }
        Some(index)
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(index) = self.configurable_queue("size") else {
            return;
        };
        let queue = &mut self.queues[index];
        let ok = u16::try_from(value).is_ok_and(|size| queue.try_set_size(size).is_ok());
        if !ok {
            let max = queue.max_size();
            self.needs_reset(format!(
                "queue {index} size {value} refused: it must be a power of two, at most {max}"
            ));
        }
    }

    fn write_queue_addr(&mut self, ring: Ring, offset: u64, value: u32) {
        let Some(index) = self.configurable_queue("address") else {
            return;
        };
        let slot = &mut self.addrs[index][ring as usize];
        *slot = if offset.is_multiple_of(8) {
            (*slot & !0xffff_ffff) | u64::from(value)
        } else {
            (*slot & 0xffff_ffff) | (u64::from(value) << 32)
        };
        let addr = GuestAddress(*slot);
        let queue = &mut self.queues[index];
        let result = match ring {
            Ring::Desc => queue.try_set_desc_table_address(addr),
            Ring::Avail => queue.try_set_avail_ring_address(addr),
            Ring::Used => queue.try_set_used_ring_address(addr),
        };
        // Alignment depends on the low half only, so the halves may come in
        // either order.
        if let Err(e) = result {
            self.needs_reset(format!("queue {index} address {:#x}: {e}", addr.0));
        }
    }

    fn write_queue_ready(&mut self, mem: &GuestMemoryMmap, value: u32) {
        let Some(index) = self.configurable_queue("ready") else {
            return;
        };
        let ready = value & 1 != 0;
        self.queues[index].set_ready(ready);
        if ready {
            if let Err(why) = check_queue(mem, &self.queues[index]) {
                self.needs_reset(format!("queue {index}: {why}"));
            }
        }
    }

    fn write_status(&mut self, mem: &GuestMemoryMmap, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        let mut new = value | (self.status & status::DEVICE_NEEDS_RESET);
        if added & status::FEATURES_OK != 0 {
            if let Err(why) = self.check_features() {
                shim_util::guest_warn!(
                    self.warnings,
                    device = self.device.name(),
                    reason = %why,
                    "FEATURES_OK refused"
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 {
            self.activate(mem);
        }
    }

    fn check_features(&self) -> Result<(), String> {
        let unknown = self.driver_features & !self.device.features();
        if unknown != 0 {
            return Err(format!(
                "the driver accepted features {unknown:#x}, which were not offered"
            ));
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(
                "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not \
                        supported on this transport)"
                    .into(),
            );
        }
        Ok(())
    }

    fn activate(&mut self, mem: &GuestMemoryMmap) {
        if self.active {
            return;
        }
        if self.status & status::FEATURES_OK == 0 {
            self.needs_reset("DRIVER_OK without FEATURES_OK: not activated".into());
            return;
        }
        if self.status & status::DEVICE_NEEDS_RESET != 0 {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                "DRIVER_OK while the device needs a reset: not activated"
            );
            return;
        }
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() {
                if let Err(why) = check_queue(mem, queue) {
                    self.needs_reset(format!("queue {index}: {why}: not activated"));
                    return;
                }
            }
        }
        match self
            .device
            .activate(mem, self.driver_features, &mut self.queues)
        {
            Ok(()) => {
                self.active = true;
                tracing::debug!(
                    device = self.device.name(),
                    base = format_args!("{:#x}", self.base),
                    features = format_args!("{:#x}", self.driver_features),
                    "activated"
                );
            }
            Err(why) => self.needs_reset(format!("activation failed: {why}")),
        }
    }

    /// Device reset (status 0): back to the state after power-on.
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.addrs.iter_mut().for_each(|a| *a = [0; 3]);
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.active = false;
    }

    fn needs_reset(&mut self, why: String) {
        shim_util::guest_warn!(
            self.warnings,
            device = self.device.name(),
            base = format_args!("{:#x}", self.base),
            reason = %why,
            "the device needs a reset"
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt_status |= INT_CONFIG_CHANGE;
    }

    fn notify(&mut self, mem: &GuestMemoryMmap, value: u32) -> Result<(), String> {
        let index = value & 0xffff;
        if index as usize >= self.queues.len() {
            shim_util::guest_warn!(
                self.warnings,
                device = self.device.name(),
                queue = index,
                "notify of a queue which does not exist: ignored"
            );
            return Ok(());
        }
        self.run_device(mem, Caller::Vcpu(Some(index as u16)))
            .map(|_| ())
    }

    /// Moves data for an idling guest (`HC_YIELD`). An error means the
    /// guest kept breaking the device and must be stopped.
    pub fn process(&mut self, mem: &GuestMemoryMmap) -> Result<Progress, String> {
        if let Some(why) = self.fatal.take() {
            return Err(why);
        }
        self.run_device(mem, Caller::Vcpu(None))
    }

    /// Moves data for a guest that polls its rings, on the network thread
    /// (see `net::poll`). A guest that broke the device once too often is
    /// stopped by its vCPU thread's next [`Self::process`].
    pub fn process_polling(&mut self, mem: &GuestMemoryMmap) -> Progress {
        if self.fatal.is_some() {
            return Progress::default();
        }
        match self.run_device(mem, Caller::Polled) {
            Ok(progress) => progress,
            Err(why) => {
                self.fatal = Some(why);
                Progress::default()
            }
        }
    }

    fn run_device(&mut self, mem: &GuestMemoryMmap, caller: Caller) -> Result<Progress, String> {
        if !self.active {
            return Ok(Progress::default());
        }
        let result = match caller {
            Caller::Vcpu(notified) => {
                self.device.on_vcpu_thread(mem);
                self.device.process(mem, &mut self.queues, notified)
            }
            Caller::Polled => self.device.process_polling(mem, &mut self.queues),
        };
        match result {
            Ok(progress) => {
                if progress.guest_should_run {
                    self.interrupt_status |= INT_USED_BUFFER;
                }
                Ok(progress)
            }
            Err(e) => {
                self.errors += 1;
                self.needs_reset(format!(
                    "queue {} stopped (error {} of {MAX_ERRORS}): {}",
                    e.queue, self.errors, e.reason
                ));
                if self.errors >= MAX_ERRORS {
                    return Err(format!(
                        "{} at {:#x}: the guest broke its queues {} times (last: queue {}: {})",
                        self.device.name(),
                        self.base,
                        self.errors,
                        e.queue,
                        e.reason
                    ));
                }
                // What the device did before the error still counts.
                Ok(Progress {
                    guest_should_run: true,
                    ..Progress::default()
                })
            }
        }
    }
}

/// Checks that a ready queue lies in guest RAM.
fn check_queue(mem: &GuestMemoryMmap, queue: &Queue) -> Result<(), String> {
    if queue.is_valid(mem) {
        Ok(())
    } else {
        Err(format!(
            "rings outside guest RAM (size {}, desc {:#x}, avail {:#x}, used {:#x})",
            queue.size(),
            queue.desc_table(),
            queue.avail_ring(),
            queue.used_ring()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::QueueError;
    use crate::vstate::vm::allocate;
    use std::sync::{Arc, Mutex};

    const BASE: u64 = 0xc000_1000;

    /// What the fake device saw.
    #[derive(Default)]
    struct Seen {
        activated: Option<u64>,
        resets: u32,
        processed: Vec<Option<u16>>,
        config: Vec<(u64, Vec<u8>)>,
        fail_next: bool,
    }

    struct Fake(Arc<Mutex<Seen>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().config.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: &GuestMemoryMmap,
            features: u64,
            queues: &mut [Queue],
        ) -> Result<(), String> {
            if !queues.iter().all(|q| q.ready()) {
                return Err("not all queues are ready".into());
            }
            self.0.lock().unwrap().activated = Some(features);
            Ok(())
        }
        fn process(
            &mut self,
            _mem: &GuestMemoryMmap,
            _queues: &mut [Queue],
            notified: Option<u16>,
        ) -> Result<Progress, QueueError> {
            let mut seen = self.0.lock().unwrap();
            seen.processed.push(notified);
            if std::mem::take(&mut seen.fail_next) {
                return Err(QueueError {
                    queue: 1,
                    reason: "bad descriptor".into(),
                });
            }
            Ok(Progress::default())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn wait_fd(&self) -> Option<RawFd> {
            None
        }
        fn name(&self) -> &'static str {
            "fake"
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn setup() -> (GuestMemoryMmap, MmioTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let t = MmioTransport::new(BASE, 0x200, Box::new(Fake(seen.clone())));
        (allocate(4 << 20).unwrap(), t, seen)
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(BASE + offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(t: &mut MmioTransport, mem: &GuestMemoryMmap, offset: u64, value: u32) {
        t.write(mem, BASE + offset, &value.to_le_bytes()).unwrap();
    }

    /// Sets up queue `index` with rings at `at` (size `size`).
    fn setup_queue(t: &mut MmioTransport, mem: &GuestMemoryMmap, index: u32, size: u32, at: u64) {
        wr(t, mem, reg::QUEUE_SEL, index);
        wr(t, mem, reg::QUEUE_NUM, size);
        wr(t, mem, reg::QUEUE_DESC_LOW, at as u32);
        wr(t, mem, reg::QUEUE_DESC_HIGH, (at >> 32) as u32);
        wr(t, mem, reg::QUEUE_AVAIL_LOW, (at + 0x1000) as u32);
        wr(t, mem, reg::QUEUE_AVAIL_HIGH, 0);
        wr(t, mem, reg::QUEUE_USED_LOW, (at + 0x2000) as u32);
        wr(t, mem, reg::QUEUE_USED_HIGH, 0);
        wr(t, mem, reg::QUEUE_READY, 1);
    }

    /// Drives the device up to DRIVER_OK the way virtio-drivers does.
    fn bring_up(t: &mut MmioTransport, mem: &GuestMemoryMmap) {
        wr(t, mem, reg::STATUS, 0);
        wr(t, mem, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, mem, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, mem, reg::DRIVER_FEATURES, 0b1);
        wr(t, mem, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, mem, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, mem, reg::STATUS, s);
        assert_eq!(rd(t, reg::STATUS), s);
        setup_queue(t, mem, 0, 128, 0x10_0000);
        setup_queue(t, mem, 1, 16, 0x11_0000);
        wr(t, mem, reg::STATUS, s | status::DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let (_, mut t, _) = setup();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 1);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert!(t.contains(BASE) && t.contains(BASE + 0x1ff));
        assert!(!t.contains(BASE + 0x200) && !t.contains(BASE - 1));
    }

    #[test]
    fn features_are_read_through_the_selector() {
        let (mem, mut t, _) = setup();
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0b101);
        wr(&mut t, &mem, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, &mem, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn queue_registers_read_back() {
        let (mem, mut t, _) = setup();
        wr(&mut t, &mem, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        wr(&mut t, &mem, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, &mem, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 2");
        setup_queue(&mut t, &mem, 0, 64, 0x10_0000);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 64);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x10_0000);
        assert_eq!(rd(&mut t, reg::QUEUE_AVAIL_LOW), 0x10_1000);
        assert_eq!(rd(&mut t, reg::QUEUE_USED_LOW), 0x10_2000);
        assert_eq!(rd(&mut t, reg::QUEUE_USED_HIGH), 0);
        let q = &t.queues()[0];
        assert_eq!(
            (q.size(), q.desc_table(), q.used_ring()),
            (64, 0x10_0000, 0x10_2000)
        );
        wr(&mut t, &mem, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn a_full_bring_up_activates_the_device() {
        let (mem, mut t, seen) = setup();
        bring_up(&mut t, &mem);
        assert!(t.is_active());
        assert_eq!(seen.lock().unwrap().activated, Some(VIRTIO_F_VERSION_1 | 1));
        assert_eq!(
            rd(&mut t, reg::STATUS) & status::DRIVER_OK,
            status::DRIVER_OK
        );
        // Notifies and yields reach the device.
        wr(&mut t, &mem, reg::QUEUE_NOTIFY, 1);
        t.process(&mem).unwrap();
        assert_eq!(seen.lock().unwrap().processed, [Some(1), None]);
        // Queue setup after DRIVER_OK is ignored.
        wr(&mut t, &mem, reg::QUEUE_SEL, 0);
        wr(&mut t, &mem, reg::QUEUE_NUM, 32);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 128);
    }

    #[test]
    fn status_zero_resets_everything() {
        let (mem, mut t, seen) = setup();
        bring_up(&mut t, &mem);
        wr(&mut t, &mem, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert!(!t.is_active());
        assert_eq!(seen.lock().unwrap().resets, 1);
        wr(&mut t, &mem, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 256);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0);
        // And it comes up again.
        bring_up(&mut t, &mem);
        assert!(t.is_active());
    }

    #[test]
    fn bad_queue_sizes_need_a_reset() {
        for size in [0, 3, 100, 512, 0x1_0000] {
            let (mem, mut t, _) = setup();
            wr(&mut t, &mem, reg::QUEUE_SEL, 0);
            wr(&mut t, &mem, reg::QUEUE_NUM, size);
            assert_ne!(
                rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "size {size}"
            );
            assert_eq!(rd(&mut t, reg::QUEUE_NUM), 256, "size {size} kept");
        }
    }

    #[test]
    fn queues_outside_ram_or_misaligned_are_refused() {
        let (mem, mut t, seen) = setup();
        // The used ring of queue 1 runs past the end of RAM.
        wr(
            &mut t,
            &mem,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&mut t, &mem, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&mut t, &mem, reg::STATUS, s);
        setup_queue(&mut t, &mem, 0, 128, 0x10_0000);
        setup_queue(&mut t, &mem, 1, 16, (4 << 20) - 0x2000);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, &mem, reg::STATUS, s | status::DRIVER_OK);
        assert!(!t.is_active());
        assert!(seen.lock().unwrap().activated.is_none());
        // Nothing moves on a device that is not active.
        t.process(&mem).unwrap();
        assert!(seen.lock().unwrap().processed.is_empty());

        let (mem, mut t, _) = setup();
        wr(&mut t, &mem, reg::QUEUE_SEL, 0);
        wr(&mut t, &mem, reg::QUEUE_DESC_LOW, 0x10_0008); // desc table needs 16
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        let (mem, mut t, _) = setup();
        wr(&mut t, &mem, reg::QUEUE_SEL, 0);
        wr(&mut t, &mem, reg::QUEUE_DESC_HIGH, 0xffff_ffff);
        wr(&mut t, &mem, reg::QUEUE_READY, 1);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn features_not_offered_are_refused() {
        let (mem, mut t, _) = setup();
        wr(
            &mut t,
            &mem,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&mut t, &mem, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, &mem, reg::DRIVER_FEATURES, 0b10); // not offered
        wr(&mut t, &mem, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&mut t, &mem, reg::STATUS, s);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Without VERSION_1, too.
        let (mem, mut t, _) = setup();
        wr(&mut t, &mem, reg::DRIVER_FEATURES, 0b1);
        wr(&mut t, &mem, reg::STATUS, s);
        assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // And DRIVER_OK without FEATURES_OK does not activate.
        setup_queue(&mut t, &mem, 0, 128, 0x10_0000);
        setup_queue(&mut t, &mem, 1, 16, 0x11_0000);
        wr(&mut t, &mem, reg::STATUS, s | status::DRIVER_OK);
        assert!(!t.is_active());
    }

    #[test]
    fn activation_refused_by_the_device_needs_a_reset() {
        let (mem, mut t, _) = setup();
        wr(&mut t, &mem, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &mem, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&mut t, &mem, reg::STATUS, s);
        setup_queue(&mut t, &mem, 0, 128, 0x10_0000); // queue 1 never ready
        wr(&mut t, &mem, reg::STATUS, s | status::DRIVER_OK);
        assert!(!t.is_active());
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let (mem, mut t, seen) = setup();
        let mut six = [0u8; 6];
        t.read(BASE + 0x100, &mut six);
        assert_eq!(six, [0, 1, 2, 3, 4, 5]);
        let mut one = [0u8; 1];
        t.read(BASE + 0x106, &mut one);
        assert_eq!(one, [6]);
        t.write(&mem, BASE + 0x104, &[9, 9]).unwrap();
        assert_eq!(seen.lock().unwrap().config, [(4, vec![9, 9])]);
        // 2-byte or unaligned register accesses are refused without effect.
        let mut two = [0xffu8; 2];
        t.read(BASE, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(&mem, BASE + reg::STATUS, &[1, 0]).unwrap();
        t.write(&mem, BASE + reg::STATUS + 1, &[1, 0, 0, 0])
            .unwrap();
        assert_eq!(t.status(), 0);
        // Unknown registers.
        assert_eq!(rd(&mut t, 0x0f0), 0);
        wr(&mut t, &mem, reg::MAGIC, 5);
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
        // Notifying a queue that does not exist, or before activation.
        wr(&mut t, &mem, reg::QUEUE_NOTIFY, 7);
        wr(&mut t, &mem, reg::QUEUE_NOTIFY, 0);
        assert!(seen.lock().unwrap().processed.is_empty());
    }

    #[test]
    fn broken_queues_need_a_reset_and_repeat_offenders_are_stopped() {
        let (mem, mut t, seen) = setup();
        bring_up(&mut t, &mem);
        for round in 1..MAX_ERRORS {
            seen.lock().unwrap().fail_next = true;
            t.process(&mem).unwrap();
            assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0, "round {round}");
            assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
            wr(&mut t, &mem, reg::INTERRUPT_ACK, INT_CONFIG_CHANGE);
            assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
            // The driver resets and comes back.
            bring_up(&mut t, &mem);
            assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
            assert!(t.is_active());
        }
        seen.lock().unwrap().fail_next = true;
        let err = t.process(&mem).unwrap_err();
        assert!(err.contains("broke its queues 8 times"), "{err}");
        assert!(err.contains("bad descriptor"), "{err}");
    }
}
