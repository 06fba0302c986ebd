//! The KVM backend: validates the images, builds each VM (RAM, image, boot
//! tables, vCPU 0 in 64-bit ring 3, a virtio-net device when the run has
//! a network), runs each vCPU on its own thread and enforces `--timeout` by
//! stopping those threads. [`restore`] does the same for a guest saved in
//! a snapshot file.
//!
//! The first guest is the main one: its console is the given writer and
//! its ending is the run's. Further guests (`--also`) print their console
//! lines with a `[name] ` prefix; they are stopped when the main guest ends.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::boot::loader;
use crate::config::RunConfig;
use crate::console::PrefixedConsole;
use crate::error::Error;
use crate::machine::{self, BootRequest, Console, Hypervisor, Machine, MachineHandle};
use crate::outcome::GuestExit;
use hostnet::{Network, NetworkConfig};

/// Boots `config.image` (and `config.also`) under KVM and runs it to the
/// end, writing the main guest's console output to `console`.
pub fn run<W: Write + Send + 'static>(config: &RunConfig, console: W) -> Result<GuestExit, Error> {
    // Images and checkpoints are checked before KVM is opened, so their
    // errors come first.
    let image = loader::inspect(&config.image, config.mem_size)?;
    let checkpoint = config
        .restore
        .as_deref()
        .map(crate::checkpoint::read_file)
        .transpose()?;
    if let Some(dir) = &config.checkpoint_to {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
    }
    for g in &config.also {
        loader::inspect(&g.image, config.mem_size)?;
    }
    let hv = Hypervisor::open(&config.kvm_device)?;
    // Published ports are bound (and may fail) before any guest boots.
    let network = config.network.as_ref().map(Network::start).transpose()?;
    let port = |index: usize| network.as_ref().and_then(|n| n.port(index));
    let nic = |index: usize| {
        config
            .network
            .as_ref()
            .and_then(|n: &NetworkConfig| n.nics.get(index).copied())
    };
    let name = config
        .image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "main".into());
    let mut guests = vec![(
        Machine::boot(
            &hv,
            BootRequest {
                name,
                image: &config.image,
                cmdline: config.cmdline.clone(),
                mem_size: config.mem_size,
                nic: nic(0),
                port: port(0),
                env: Vec::new(),
                args: Vec::new(),
            },
            Box::new(console),
        )?,
        "main".to_owned(),
    )];
    if let Some(blob) = &checkpoint {
        guests[0].0.place_checkpoint(blob, image.load_end)?;
    }
    guests[0]
        .0
        .doorbell
        .set_checkpoint_dir(config.checkpoint_to.clone());
    guests[0]
        .0
        .doorbell
        .set_checkpoint_max(config.checkpoint_max);
    for (index, spec) in config.also.iter().enumerate() {
        let console: Console = Box::new(PrefixedConsole::new(
            format!("[{}] ", spec.name),
            std::io::stdout(),
        ));
        guests.push((
            Machine::boot(
                &hv,
                BootRequest {
                    name: spec.name.clone(),
                    image: &spec.image,
                    cmdline: spec.cmdline.clone(),
                    mem_size: config.mem_size,
                    nic: nic(index + 1),
                    port: port(index + 1),
                    env: Vec::new(),
                    args: Vec::new(),
                },
                console,
            )?,
            spec.name.clone(),
        ));
    }
    let exit = run_guests(guests, config.timeout);
    drop(network);
    exit
}

/// Runs the guest saved in the snapshot file `path` (see
/// [`crate::snapshot`]) until it ends or `timeout`, on a network of its
/// own made from `network` (its card keeps its MAC and IP), telling it
/// that it now runs on `host_name` in `region`.
pub fn restore<W: Write + Send + 'static>(
    path: &Path,
    kvm_device: &Path,
    network: Option<NetworkConfig>,
    host_name: &str,
    region: &str,
    timeout: Option<Duration>,
    console: W,
) -> Result<GuestExit, Error> {
    let hv = Hypervisor::open(kvm_device)?;
    let (state, vm) = crate::snapshot::load(&hv, path)?;
    let network = match (network, state.spec.nic) {
        (Some(mut config), Some(nic)) => {
            config.nics = vec![nic.into()];
            Some(config)
        }
        (None, Some(nic)) => Some(hostnet::NetworkConfig {
            mode: hostnet::NetMode::User,
            publish: Vec::new(),
            nics: vec![nic.into()],
        }),
        (Some(_), None) => {
            return Err(Error::Config(
                "the saved guest has no network card: --publish and --net do not apply".into(),
            ))
        }
        (None, None) => None,
    };
    let network = network.as_ref().map(Network::start).transpose()?;
    let port = network.as_ref().and_then(|n| n.port(0));
    let mut machine = Machine::restore(vm, state, port, Box::new(console))?;
    machine.set_location(host_name, region)?;
    let exit = run_guests(vec![(machine, "main".to_owned())], timeout);
    drop(network);
    exit
}

/// Runs every guest on its own thread until the main one (the first) is
/// done or `timeout`; then stops the others.
fn run_guests(
    guests: Vec<(Machine, String)>,
    timeout: Option<Duration>,
) -> Result<GuestExit, Error> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let (tx, rx) = mpsc::channel::<machine::Ended>();
    let mut running: Vec<(MachineHandle, String)> = Vec::new();
    for (index, (m, name)) in guests.into_iter().enumerate() {
        running.push((machine::spawn(m, index, tx.clone(), deadline)?, name));
    }
    drop(tx);
    let limit = timeout.unwrap_or_default();

    // Wait for the main guest; report the others as they end.
    let main_exit = loop {
        let answer = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match answer {
            Ok((index, exit)) => {
                running[index].0.join();
                if index == 0 {
                    break Some(exit.unwrap_or(GuestExit::TimedOut(limit)));
                }
                report_other(&running[index].1, exit);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Some(GuestExit::Died(
                    "the vCPU thread ended without an answer".into(),
                ))
            }
        }
    };

    // Stop whatever still runs.
    let mut main_exit = main_exit;
    for (h, _) in &running {
        h.request_stop();
    }
    for (h, name) in &running {
        if !h.stop() {
            tracing::warn!(instance = %name, "the vCPU thread did not stop; leaving it behind");
        }
    }
    while let Ok((index, exit)) = rx.try_recv() {
        if index == 0 && main_exit.is_none() {
            // A guest that exited on its own just as time ran out keeps
            // its own ending.
            main_exit = exit.map(Some).unwrap_or(None);
        } else if index != 0 && exit.is_some() {
            report_other(&running[index].1, exit);
        }
    }
    Ok(main_exit.unwrap_or(GuestExit::TimedOut(limit)))
}

/// Logs how an `--also` guest ended (if it ended on its own).
fn report_other(name: &str, exit: Option<GuestExit>) {
    match exit {
        None => {}
        Some(GuestExit::Exited(code)) => {
            tracing::info!(instance = %name, status = code, "guest exited")
        }
        Some(exit) => tracing::warn!(instance = %name, exit = %exit, "guest ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::cpu;
    use crate::config::Backend;
    use crate::testutil::{require_kvm, run_config, Asm, TestImage};
    use crate::vstate::vm::{open_kvm, KVM_DEVICE};
    use abi::hypercall::{
        ConsoleWrite, FaultReport, PanicReport, HC_CONSOLE_WRITE, HC_FAULT, HC_PANIC, HC_YIELD,
    };
    use abi::layout::{CMDLINE_ADDR, IDT_ADDR, PVCLOCK_ADDR};
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::Mutex;
    use zerocopy::IntoBytes;

    /// A console that tests can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn config(image: &TestImage, name: &str, timeout: Option<f64>) -> RunConfig {
        RunConfig {
            mem_size: 16 << 20,
            timeout: timeout.map(Duration::from_secs_f64),
            ..run_config(Backend::Kvm, image.write(name))
        }
    }

    /// Boots `image` and returns how it ended and its console output.
    fn boot(image: &TestImage, name: &str, timeout: Option<f64>) -> (GuestExit, String) {
        require_kvm();
        let console = Captured::default();
        let exit = run(&config(image, name, timeout), console.clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
        (exit, out)
    }

    fn status(image: &TestImage, name: &str) -> u8 {
        let (exit, _) = boot(image, name, Some(20.0));
        match exit {
            GuestExit::Exited(code) => code,
            other => panic!("{name}: {other}"),
        }
    }

    #[test]
    fn a_hand_made_guest_exits_with_its_code() {
        let start = Instant::now();
        assert_eq!(status(&TestImage::exit(7), "exit7"), 7);
        eprintln!(
            "exit(7) guest: {:?} from image file to exit",
            start.elapsed()
        );
    }

    #[test]
    fn the_guest_runs_in_ring_3() {
        let code = Asm::new().cpl_to_eax().exit_rax().spin();
        assert_eq!(status(&TestImage::new(code), "cpl"), 3);
    }

    #[test]
    fn rdi_points_at_the_boot_info() {
        // mov rax, [rdi]; mov rcx, BOOT_MAGIC; cmp rax, rcx; sete al; movzx eax, al
        let code = Asm::new()
            .raw(&[0x48, 0x8b, 0x07, 0x48, 0xb9])
            .raw(&abi::boot::BOOT_MAGIC.to_le_bytes())
            .raw(&[0x48, 0x39, 0xc8, 0x0f, 0x94, 0xc0, 0x0f, 0xb6, 0xc0])
            .exit_rax()
            .spin();
        assert_eq!(status(&TestImage::new(code), "bootinfo"), 1);
        // mov eax, [rdi + 12]: the platform.
        let code = Asm::new().raw(&[0x8b, 0x47, 0x0c]).exit_rax().spin();
        assert_eq!(
            status(&TestImage::new(code), "platform"),
            abi::boot::Platform::Shim as u8
        );
    }

    #[test]
    fn the_command_line_is_in_guest_memory() {
        // movzx eax, byte [CMDLINE_ADDR]
        let code = Asm::new()
            .raw(&[0x0f, 0xb6, 0x04, 0x25])
            .raw(&(CMDLINE_ADDR as u32).to_le_bytes())
            .exit_rax()
            .spin();
        assert_eq!(status(&TestImage::new(code), "cmdline"), b'l');
    }

    #[test]
    fn console_writes_reach_the_console() {
        let request = ConsoleWrite {
            buf: TestImage::DATA + 0x100,
            len: 12,
        };
        let code = Asm::new()
            .mov_eax(TestImage::DATA as u32)
            .hypercall(HC_CONSOLE_WRITE)
            .hypercall(HC_CONSOLE_WRITE)
            .exit(0)
            .spin();
        let image = TestImage::new(code)
            .data(0, request.as_bytes())
            .data(0x100, b"hello guest\n");
        let (exit, out) = boot(&image, "console", Some(20.0));
        assert!(matches!(exit, GuestExit::Exited(0)), "{exit}");
        assert_eq!(out, "hello guest\nhello guest\n");
    }

    #[test]
    fn exceptions_reach_the_ring0_stubs() {
        // The test image's stubs exit with the vector number.
        let ud = Asm::new().ud2();
        assert_eq!(status(&TestImage::new(ud), "ud2"), 6);
        // The null page is unmapped: reading it is a page fault.
        let null = Asm::new().load_eax_abs(0).spin();
        assert_eq!(status(&TestImage::new(null), "null"), 14);
        // So is the stack guard.
        let guard = Asm::new()
            .load_eax_abs(abi::layout::STACK_GUARD_ADDR as u32)
            .spin();
        assert_eq!(status(&TestImage::new(guard), "guard"), 14);
    }

    #[test]
    fn a_guest_without_idt_triple_faults() {
        // mov edi, IDT_ADDR; mov ecx, 512; xor eax, eax; rep stosq; ud2
        let code = Asm::new()
            .raw(&[0xbf])
            .raw(&(IDT_ADDR as u32).to_le_bytes())
            .raw(&[0xb9, 0x00, 0x02, 0x00, 0x00, 0x31, 0xc0, 0xf3, 0x48, 0xab])
            .ud2();
        let (exit, _) = boot(&TestImage::new(code), "triple", Some(20.0));
        assert!(matches!(exit, GuestExit::TripleFault(_)), "{exit}");
        assert_eq!(exit.status(), 125);
        assert!(exit.to_string().starts_with("guest triple-faulted"));
    }

    #[test]
    fn panic_and_fault_reports() {
        let report = PanicReport {
            msg: TestImage::DATA + 0x100,
            msg_len: 4,
            file: TestImage::DATA + 0x200,
            file_len: 7,
            line: 42,
            column: 9,
        };
        let code = Asm::new()
            .mov_eax(TestImage::DATA as u32)
            .hypercall(HC_PANIC)
            .spin();
        let image = TestImage::new(code)
            .data(0, report.as_bytes())
            .data(0x100, b"boom")
            .data(0x200, b"main.rs");
        let (exit, _) = boot(&image, "panic", Some(20.0));
        assert_eq!(exit.to_string(), "guest panicked at main.rs:42:9: boom");
        assert_eq!(exit.status(), 101);

        let fault = FaultReport {
            vector: 14,
            error_code: 4,
            rip: 0x10_0042,
            cs: 0x23,
            rsp: 0x7_fff8,
            cr2: 0xdead_0000,
            ..Default::default()
        };
        let code = Asm::new()
            .mov_eax(TestImage::DATA as u32)
            .hypercall(HC_FAULT)
            .spin();
        let (exit, _) = boot(
            &TestImage::new(code).data(0, fault.as_bytes()),
            "fault",
            Some(20.0),
        );
        assert_eq!(exit.status(), 102);
        assert!(exit.to_string().ends_with("address 0xdead0000"), "{exit}");
    }

    #[test]
    fn unhandled_mmio_and_unknown_hypercalls_do_not_stop_the_guest() {
        let code = Asm::new()
            .mov_ebx(0xc000_2000) // a virtio window, no device behind it yet
            .store_rax_at_rbx()
            .hypercall(77)
            .mov_ebx(0xc000_2000)
            .load_rax_from_rbx() // all ones
            .raw(&[0x25, 0xff, 0x00, 0x00, 0x00]) // and eax, 0xff
            .exit_rax()
            .spin();
        assert_eq!(status(&TestImage::new(code), "mmio"), 0xff);
    }

    #[test]
    fn kvmclock_is_programmed_when_offered() {
        require_kvm();
        let kvm = open_kvm(Path::new(KVM_DEVICE)).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let expected = u8::from(cpu::kvmclock_supported(&cpuid));
        // tsc_to_system_mul (offset 24 of pvclock_vcpu_time_info) != 0
        let code = Asm::new()
            .load_eax_abs(PVCLOCK_ADDR as u32 + 24)
            .eax_nonzero()
            .exit_rax()
            .spin();
        assert_eq!(status(&TestImage::new(code), "kvmclock"), expected);
    }

    #[test]
    fn a_spinning_guest_is_stopped_by_the_timeout() {
        let start = Instant::now();
        let (exit, _) = boot(&TestImage::new(Asm::new().spin()), "spin", Some(0.3));
        let took = start.elapsed();
        assert!(matches!(exit, GuestExit::TimedOut(_)), "{exit}");
        assert_eq!(exit.status(), 124);
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[test]
    fn yield_sleeps_and_is_cut_short_by_the_timeout() {
        let code = Asm::new()
            .mov_eax(50_000_000) // 50 ms
            .hypercall(HC_YIELD)
            .exit(3)
            .spin();
        let start = Instant::now();
        assert_eq!(status(&TestImage::new(code), "yield"), 3);
        assert!(start.elapsed() >= Duration::from_millis(50));

        let forever = Asm::new().mov_rax(u64::MAX).hypercall(HC_YIELD).spin();
        let start = Instant::now();
        let (exit, _) = boot(&TestImage::new(forever), "yield-forever", Some(0.2));
        assert!(matches!(exit, GuestExit::TimedOut(_)), "{exit}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn image_errors_come_before_kvm() {
        let mut config = config(&TestImage::exit(0), "unused", None);
        config.image = crate::testutil::junk_image("kvm-errors");
        let e = run(&config, Vec::new()).unwrap_err();
        assert!(e.to_string().ends_with("is not an ELF file"), "{e}");

        let mut config = config.clone();
        config.image = TestImage::exit(0).bss(20 << 20).write("too-big");
        let e = run(&config, Vec::new()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("needs 22 MiB of guest memory but --mem is 16 MiB"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_kvm_device_is_named() {
        let mut config = config(&TestImage::exit(0), "no-kvm", None);
        config.kvm_device = "/nonexistent/kvm".into();
        let e = run(&config, Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/kvm not found: this host has no KVM \
             (enable virtualization, or load kvm_intel/kvm_amd)"
        );
    }
}
