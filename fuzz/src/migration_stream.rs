//! `migration_stream`: the migration stream decoder and the machine state it carries.
//!
//! The migration stream decoder over the input as what a peer sent: frames
//! (kind, length, payload) until the input ends, each payload decoded as the receiving side
//! does (postcard `Hello`/`Accept`/`Committed`'s `Ack`/`MachineState`, page lists, text). A decoded
//! `MachineState`'s devices are restored into fresh transports ([`crate::snapshot`]).

use migration::protocol::{encode_pages, read_msg, Accept, Ack, Hello, Kind};
use vmm::snapshot::state::MachineState;

/// Messages read per input.
const MAX_MESSAGES: usize = 64;
pub fn run(data: &[u8]) {
    let mut stream = data;
    for _ in 0..MAX_MESSAGES {
        let Ok(m) = read_msg(&mut stream) else {
            return;
        };
        match m.kind {
            Kind::Hello => drop(m.value::<Hello>()),
            Kind::Accept => drop(m.value::<Accept>()),
            Kind::Committed => drop(m.value::<Ack>()),
            Kind::Query | Kind::Outcome => {
                // A migration id (8 bytes) and a started flag (1 byte): raw payloads.
                let _ = m.payload.len();
            }
            Kind::State => {
                if let Ok(state) = m.value::<MachineState>() {
                    let mem = crate::guest_memory(crate::virtio_net::RAM);
                    crate::snapshot::restore_devices(&mem, &state.devices);
                }
            }
            Kind::Pages | Kind::Zeroes => {
                if let Ok((indices, pages)) = m.pages() {
                    assert_eq!(
                        encode_pages(&indices, pages),
                        m.payload,
                        "a decoded page list encodes back to its payload"
                    );
                }
            }
            Kind::Abort | Kind::Refuse | Kind::Failed => drop(m.text()),
            Kind::Sync | Kind::Synced | Kind::Ready | Kind::Commit => {}
        }
    }
}
