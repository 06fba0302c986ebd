//! An app's workload: how many requests (and bytes) came from each client
//! region over the last measurement interval, as the shims count them at the
//! app's published ports.
//!
//! Sparse on purpose: only client regions with traffic are listed, so a
//! score walks `C` entries, not every region.

use serde::{Deserialize, Serialize};

use crate::model::RegionId;

/// Traffic from one client region over the interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTraffic {
    /// Where the clients are.
    pub region: RegionId,
    /// Requests (or connections, for protocols without requests) counted.
    pub requests: u64,
    /// Bytes in both directions.
    pub bytes: u64,
}

/// Per client region traffic of one app over the last interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    clients: Vec<ClientTraffic>,
}

impl Workload {
    /// No traffic.
    pub fn new() -> Self {
        Workload::default()
    }

    /// Adds traffic from `region` (merged with what is already there).
    /// Regions with no requests and no bytes are not listed.
    pub fn add(&mut self, region: RegionId, requests: u64, bytes: u64) -> &mut Self {
        if requests == 0 && bytes == 0 {
            return self;
        }
        match self.clients.iter_mut().find(|c| c.region == region) {
            Some(c) => {
                c.requests += requests;
                c.bytes += bytes;
            }
            None => self.clients.push(ClientTraffic {
                region,
                requests,
                bytes,
            }),
        }
        self
    }

    /// Builder form of [`add`](Self::add).
    pub fn with(mut self, region: RegionId, requests: u64, bytes: u64) -> Self {
        self.add(region, requests, bytes);
        self
    }

    /// The client regions with traffic.
    pub fn clients(&self) -> &[ClientTraffic] {
        &self.clients
    }

    /// Total requests.
    pub fn total_requests(&self) -> u64 {
        self.clients.iter().map(|c| c.requests).sum()
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.clients.iter().map(|c| c.bytes).sum()
    }

    /// The client region with the most requests (lowest id on a tie).
    pub fn busiest(&self) -> Option<RegionId> {
        self.clients
            .iter()
            .filter(|c| c.requests > 0)
            .max_by(|a, b| a.requests.cmp(&b.requests).then(b.region.cmp(&a.region)))
            .map(|c| c.region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_merges_and_skips_empty() {
        let mut w = Workload::new();
        w.add(RegionId(1), 10, 100)
            .add(RegionId(2), 0, 0)
            .add(RegionId(1), 5, 50);
        assert_eq!(w.clients().len(), 1);
        assert_eq!(w.total_requests(), 15);
        assert_eq!(w.total_bytes(), 150);
    }

    #[test]
    fn busiest_breaks_ties_by_id() {
        let w = Workload::new()
            .with(RegionId(2), 7, 0)
            .with(RegionId(1), 7, 0)
            .with(RegionId(0), 3, 0);
        assert_eq!(w.busiest(), Some(RegionId(1)));
        assert_eq!(Workload::new().busiest(), None);
    }
}
