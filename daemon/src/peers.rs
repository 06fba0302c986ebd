//! This daemon's peers: clients of other daemons (TLS to a pinned
//! certificate, through the `--peer-via` relay of their address), and the
//! overlay kept joined to every pinned peer.

use std::thread;
use std::time::{Duration, Instant};

use crate::Daemon;

/// The longest a read or write to another daemon may block, unless the
/// caller of [`Daemon::peer_client`] sets its own.
pub const PEER_IO_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Puts every pinned peer with an address on the overlay (at that
    /// address, UDP: a shim's overlay listens on its API address unless
    /// told otherwise), so a fleet of secure hosts is a full mesh without
    /// `--peer`: a guest that moved twice still reaches the gateway it
    /// knew, and its clients reach it. Also done when a guest arrives, so
    /// that its first frames reach every host.
    pub fn join_pinned_peers(&self) {
        if let Some(sec) = &self.config.security {
            for addr in sec.peers().iter().filter_map(|p| p.overlay_addr()) {
                self.net.add_peer(addr);
            }
        }
    }

    /// A client of another daemon, `to` (an address or a pinned peer's
    /// name): plain HTTP when this daemon has no identity, else TLS only,
    /// to a pinned certificate (`fingerprint`, or that of the peer named,
    /// or at the address, `to`), presenting this host's own.
    pub fn peer_client(&self, to: &str, fingerprint: Option<&str>) -> Result<api::Client, String> {
        let Some(sec) = &self.config.security else {
            if to.starts_with("https://") {
                return Err(format!(
                    "this shim has no identity and cannot speak TLS to {to}: \
                     start it with `host-shim init` and `host-shim serve`"
                ));
            }
            return Ok(self.routed(api::Client::new(to)));
        };
        let (addr, pin) = match fingerprint {
            Some(fp) => (to.to_owned(), fp.parse::<security::Fingerprint>()?),
            None => {
                let peer = sec.peer_by_name_or_addr(to).ok_or_else(|| {
                    format!(
                        "'{}' is not a pinned peer of this shim: give its fingerprint, or pin it \
                     here with `host-shim peer add NAME SHA256:... --addr https://HOST:PORT`",
                        to
                    )
                })?;
                let fp = peer.fingerprint.parse::<security::Fingerprint>()?;
                let addr = match peer.addr {
                    Some(a) if peer.name == to => a,
                    None if peer.name == to => {
                        return Err(format!(
                            "peer '{}' has no address here: migrate --to https://HOST:PORT, or \
                         pin it with one (host-shim peer add {} {} --addr https://HOST:PORT)",
                            peer.name, peer.name, peer.fingerprint
                        ))
                    }
                    _ => to.to_owned(),
                };
                (addr, fp)
            }
        };
        api::Client::secure(&addr, pin, None, Some(&sec.identity))
            .map(|c| self.routed(c))
            .map_err(|e| e.to_string())
    }

    /// `client`, connecting through the `--peer-via` relay of its address
    /// if it has one (TCP to peers takes the same paths as the overlay),
    /// each read and write bounded by [`PEER_IO_TIMEOUT`] unless its
    /// caller sets another.
    fn routed(&self, client: api::Client) -> api::Client {
        let client = client.with_timeout(PEER_IO_TIMEOUT);
        let via = self.config.overlay.as_ref().and_then(|o| {
            let real = client.addr.parse::<std::net::SocketAddr>().ok()?;
            o.via.iter().find(|(r, _)| *r == real).map(|(_, via)| *via)
        });
        match via {
            Some(via) => client.via(via),
            None => client,
        }
    }
}

/// Keeps the pinned peers on the overlay ([`Daemon::join_pinned_peers`]):
/// pins added later join within 100 ms (the overlay takes datagrams only
/// from its peers' addresses), and every second anyway (names re-resolved);
/// a host unpinned leaves it within 100 ms.
pub(crate) fn overlay_to_pinned_peers(daemon: &Daemon) {
    let Some(security) = &daemon.config.security else {
        return;
    };
    let mut joined: Option<(Vec<security::identity::Peer>, Instant)> = None;
    loop {
        let pins = security.peers();
        if joined
            .as_ref()
            .is_none_or(|(p, at)| *p != pins || at.elapsed() >= Duration::from_secs(1))
        {
            // A host unpinned since: its overlay datagrams are dropped from now on.
            for gone in joined.iter().flat_map(|(p, _)| p.iter()) {
                if let Some(addr) = gone.overlay_addr() {
                    if !pins.iter().any(|p| p.overlay_addr() == Some(addr)) {
                        daemon.net.remove_peer(addr);
                    }
                }
            }
            daemon.join_pinned_peers();
            joined = Some((pins, Instant::now()));
        }
        thread::sleep(Duration::from_millis(100));
    }
}
