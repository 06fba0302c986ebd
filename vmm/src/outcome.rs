//! How a guest run ended ([`GuestExit`]) and the process exit status each
//! ending maps to.
//!
//! | status | meaning |
//! |---|---|
//! | 0..=255 | the guest's own `exit(code)` (101 = guest panic, 102 = CPU exception, see `abi::exit`) |
//! | 1 | also: the shim could not run the guest (bad image, no KVM, bad flags) |
//! | 124 | `--timeout` expired and the guest was stopped |
//! | 125 | the guest died without an exit code: triple fault, `hlt`, KVM internal error, QEMU power-off |

use std::fmt;
use std::time::Duration;

use abi::hypercall::{exception_name, FaultReport};

/// Exit status when `--timeout` stops the guest (as `timeout(1)`).
pub const STATUS_TIMEOUT: u8 = 124;
/// Exit status when the guest died without giving an exit code.
pub const STATUS_GUEST_DIED: u8 = 125;
/// Exit status when the shim itself failed.
pub const STATUS_SHIM_ERROR: u8 = 1;

/// The general registers and control state of a dead vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterDump {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cs: u16,
    pub ss: u16,
    pub efer: u64,
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip {:#018x} rsp {:#018x} rflags {:#x}\n  \
             cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}\n  \
             cs {:#x} ss {:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            self.cs,
            self.ss
        )
    }
}

/// How a guest run ended. (Not `PartialEq`: `abi`'s report structs are not.)
#[derive(Clone, Debug)]
pub enum GuestExit {
    /// The guest called `exit(code)`.
    Exited(u8),
    /// The guest reported a panic.
    Panicked {
        file: String,
        line: u32,
        column: u32,
        message: String,
    },
    /// The guest reported a CPU exception.
    Faulted(FaultReport),
    /// The guest reported a CPU exception, but its report at this address
    /// could not be read.
    FaultUnreadable(u64),
    /// The vCPU shut down (a fault while delivering a double fault).
    TripleFault(RegisterDump),
    /// The vCPU executed `hlt` with nothing to wake it.
    Halted,
    /// `--timeout` expired.
    TimedOut(Duration),
    /// QEMU stopped without an exit code (the guest powered off or reset).
    PoweredOff,
    /// KVM could not go on running the guest.
    Died(String),
}

impl GuestExit {
    /// The shim's process exit status for this ending.
    pub fn status(&self) -> u8 {
        match self {
            GuestExit::Exited(code) => *code,
            GuestExit::Panicked { .. } => abi::exit::EXIT_PANIC,
            GuestExit::Faulted(_) | GuestExit::FaultUnreadable(_) => abi::exit::EXIT_FAULT,
            GuestExit::TimedOut(_) => STATUS_TIMEOUT,
            GuestExit::TripleFault(_)
            | GuestExit::Halted
            | GuestExit::PoweredOff
            | GuestExit::Died(_) => STATUS_GUEST_DIED,
        }
    }

    /// What to print on stderr about this ending (nothing for a clean exit).
    pub fn report(&self) -> Option<String> {
        match self {
            GuestExit::Exited(_) => None,
            _ => Some(self.to_string()),
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::Exited(code) => write!(f, "guest exited with status {code}"),
            GuestExit::Panicked {
                file,
                line,
                column,
                message,
            } => write!(f, "guest panicked at {file}:{line}:{column}: {message}"),
            GuestExit::Faulted(r) => {
                write!(
                    f,
                    "guest fault: {} (vector {}, error code {:#x}) at rip {:#x} (cs {:#x}, rsp {:#x})",
                    exception_name(r.vector),
                    r.vector,
                    r.error_code,
                    r.rip,
                    r.cs,
                    r.rsp
                )?;
                if r.vector == 14 {
                    write!(f, ", address {:#x}", r.cr2)?;
                }
                Ok(())
            }
            GuestExit::FaultUnreadable(addr) => write!(
                f,
                "guest fault (its report at {addr:#x} is outside guest memory)"
            ),
            GuestExit::TripleFault(regs) => write!(f, "guest triple-faulted\n  {regs}"),
            GuestExit::Halted => write!(
                f,
                "guest halted (hlt with interrupts off: nothing can wake it): stopped"
            ),
            GuestExit::TimedOut(t) => write!(
                f,
                "guest did not exit within {} s (--timeout): stopped",
                t.as_secs_f64()
            ),
            GuestExit::PoweredOff => write!(f, "guest powered off without an exit code"),
            GuestExit::Died(why) => write!(f, "guest stopped: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(GuestExit::Exited(7).status(), 7);
        assert_eq!(GuestExit::TimedOut(Duration::from_secs(1)).status(), 124);
        assert_eq!(GuestExit::Halted.status(), 125);
        assert_eq!(
            GuestExit::TripleFault(RegisterDump::default()).status(),
            125
        );
        assert_eq!(GuestExit::Faulted(FaultReport::default()).status(), 102);
        assert!(GuestExit::Exited(0).report().is_none());
    }

    #[test]
    fn messages() {
        let p = GuestExit::Panicked {
            file: "src/main.rs".into(),
            line: 3,
            column: 5,
            message: "boom".into(),
        };
        assert_eq!(p.to_string(), "guest panicked at src/main.rs:3:5: boom");
        let pf = GuestExit::Faulted(FaultReport {
            vector: 14,
            error_code: 6,
            rip: 0x10_0000,
            cs: 0x23,
            rsp: 0x7_fff0,
            cr2: 0x10,
            ..Default::default()
        });
        assert_eq!(
            pf.to_string(),
            "guest fault: page fault (#PF) (vector 14, error code 0x6) at rip 0x100000 \
             (cs 0x23, rsp 0x7fff0), address 0x10"
        );
        let t = GuestExit::TimedOut(Duration::from_millis(1500));
        assert_eq!(
            t.to_string(),
            "guest did not exit within 1.5 s (--timeout): stopped"
        );
    }
}
