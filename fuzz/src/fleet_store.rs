//! `fleet_store`: fleet records and events as read back from the store.
//!
//! The input is the fleet store's file (`file://PATH`) as a hostile or damaged writer left
//! it: a [`fleet::store::FileStore`] reads it and [`fleet::Fleet`] decodes its hosts, apps and
//! events as the CLI, the scheduler and `events --follow` do (`hosts`, `apps`, `host`, `app`,
//! `host_by_addr`, `events`), and each host decoded (of the first [`LOOKUPS`]) is turned into an
//! API client ([`fleet::client_for`]: its URL, pinned fingerprint and token). Records that do
//! not decode are skipped or refused, never a panic. The events come in revision order, and
//! those after a revision are exactly the tail of the whole history.

use std::path::PathBuf;
use std::sync::OnceLock;

use fleet::store::FileStore;
use fleet::Fleet;

/// The store file, one per process (libFuzzer runs one input at a time).
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("host-shim-fuzz-fleet-{}.json", std::process::id()))
    })
}

pub fn run(data: &[u8]) {
    let path = path();
    std::fs::write(path, data).expect("write the store file");
    read_back(&Fleet::new(Box::new(FileStore::new(path))));
    let _ = std::fs::remove_file(path);
}

/// Hosts and apps looked up by name (and hosts turned into clients) per input: each lookup reads
/// and decodes the whole file again, so a file of many records would otherwise cost its square.
const LOOKUPS: usize = 8;

fn read_back(fleet: &Fleet) {
    if let Ok(hosts) = fleet.hosts() {
        for h in hosts.iter().take(LOOKUPS) {
            let _ = h.addr();
            let _ = fleet::client_for(h).map_err(|e| e.to_string());
            let _ = fleet.host(&h.name);
        }
        if let Some(h) = hosts.first() {
            let _ = fleet.host_by_addr(h.addr());
        }
    }
    if let Ok(apps) = fleet.apps() {
        for a in apps.iter().take(LOOKUPS) {
            let _ = fleet.app(&a.name);
        }
    }
    if let Ok(all) = fleet.events(0) {
        assert!(
            all.windows(2).all(|w| w[0].rev <= w[1].rev),
            "events out of revision order"
        );
        for e in &all {
            let _ = e.kind.to_string();
        }
        if let Some(mid) = all.get(all.len() / 2).map(|e| e.rev) {
            let tail = fleet.events(mid).expect("the same file reads again");
            let want: Vec<_> = all.iter().filter(|e| e.rev > mid).cloned().collect();
            assert_eq!(tail, want, "the events after revision {mid}");
        }
    }
}
