//! A TAP device as a switch port (`--net tap=NAME`): frames the host sends
//! to the TAP interface reach the guests, and theirs reach the host's
//! kernel, which routes or bridges them as configured.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI` (plain Ethernet frames,
//! no vnet header). It is created if missing (then it disappears when the
//! shim exits); a device made beforehand with
//! `ip tuntap add dev NAME mode tap user USER` can be used without root.
//! Either way the host side still needs an address and `ip link set NAME up`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::port::Frame;
use super::NetError;

/// The clone device of TUN/TAP.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// An open TAP device.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP device `name`, non-blocking.
    pub fn open(name: &str) -> Result<Self, NetError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|e| NetError::Tap {
                name: name.to_owned(),
                detail: match e.kind() {
                    io::ErrorKind::NotFound => {
                        format!("{TUN_DEVICE} does not exist (load the tun module: modprobe tun)")
                    }
                    io::ErrorKind::PermissionDenied => format!(
                        "cannot open {TUN_DEVICE}: permission denied (TAP devices need \
                         CAP_NET_ADMIN: run as root, or create the device beforehand with \
                         `ip tuntap add dev {name} mode tap user $USER`)"
                    ),
                    _ => format!("cannot open {TUN_DEVICE}: {e}"),
                },
            })?;
        let name = crate::sys::tun_set_iff(&file, name).map_err(|e| NetError::Tap {
            name: name.to_owned(),
            detail: match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "permission denied (creating or attaching a TAP device needs CAP_NET_ADMIN, \
                     unless it was made for your user with `ip tuntap add dev {name} mode tap \
                     user $USER`): {e}"
                ),
                Some(libc::EBUSY) => format!("the device is in use by another program: {e}"),
                Some(libc::EINVAL) => {
                    format!("is the name taken by an interface that is not a TAP device? {e}")
                }
                _ => e.to_string(),
            },
        })?;
        Ok(Self { file, name })
    }

    /// The host side of the TAP device `name`, whose device side another
    /// monitor holds (Firecracker): the interface is set up and a packet
    /// socket on it carries the frames of that monitor's guest, so the TAP
    /// is one more leg of the switch.
    pub fn host_side(name: &str) -> Result<Self, NetError> {
        let fail = |what: &str, e: io::Error| NetError::Tap {
            name: name.to_owned(),
            detail: format!("{what}: {e}"),
        };
        crate::sys::set_link_up(name).map_err(|e| fail("cannot set the link up", e))?;
        let socket = crate::sys::packet_socket(name)
            .map_err(|e| fail("cannot open a packet socket on it (needs CAP_NET_RAW)", e))?;
        Ok(Self {
            file: File::from(socket),
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the frames waiting, at most `max`, into `out`; returns whether
    /// it stopped because there were no more.
    pub fn read_frames(&mut self, out: &mut Vec<Frame>, max: usize) -> io::Result<bool> {
        let mut buf = [0u8; 65536];
        for _ in 0..max {
            match self.file.read(&mut buf) {
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The host side of a TAP whose monitor exited (`host_side`).
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                    tracing::debug!(tap = %self.name, error = %e, "the device went away");
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Sends `frames` (emptied) to the host; frames the kernel has no room
    /// for are dropped, as on a real link.
    pub fn write_frames(&mut self, frames: &mut Vec<Frame>) {
        for frame in frames.drain(..) {
            match self.file.write(&frame) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!(tap = %self.name, error = %e, "frame dropped"),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
