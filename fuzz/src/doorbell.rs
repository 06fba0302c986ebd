//! `doorbell`: hypercalls against a small guest memory.
//!
//! Hypercalls as a hostile guest makes them, against a small guest memory holding
//! the requests (console writes, panic and fault reports, checkpoint blobs and deltas).
//!
//! The input is a list of operations: opcode 0 writes guest memory (addr: u16, len: u16,
//! bytes); any other rings the doorbell (slot offset: u16, width selector: u8, value: u64).
//! Checkpoints go to a [`Latest`], so every accepted one must decode again.

use std::sync::Arc;

use abi::layout::{DOORBELL_ADDR, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm::checkpoint::Latest;
use vmm::devices::doorbell::{Action, Doorbell};

use crate::Input;

/// Guest RAM.
pub const RAM: u64 = 64 << 10;
const MAX_OPS: usize = 256;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = crate::guest_memory(RAM);
    let latest = Arc::new(Latest::default());
    let mut doorbell = Doorbell::new(std::io::sink());
    doorbell.set_checkpoint_latest(Some(latest.clone()));
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        if input.u8() == 0 {
            let addr = u64::from(input.u16());
            let len = usize::from(input.u16());
            let _ = mem.write_slice(input.bytes(len), GuestAddress(addr));
            continue;
        }
        let addr = DOORBELL_ADDR + u64::from(input.u16()) % PAGE_SIZE;
        let len = [8usize, 4, 2, 1][usize::from(input.u8() & 3)];
        let value = input.u64().to_le_bytes();
        match doorbell.write(&mem, addr, &value[..len]) {
            Action::Continue | Action::Yield(_) => {}
            Action::Stop(exit) => {
                let _ = (exit.to_string(), exit.status());
                break;
            }
        }
    }
    // What was recorded is a chain that decodes.
    if let Some(chain) = latest.wait_after(0, std::time::Duration::ZERO) {
        abi::checkpoint::latest_chain(&chain).expect("a stored checkpoint chain decodes");
    }
}
