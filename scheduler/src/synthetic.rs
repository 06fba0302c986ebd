//! A synthetic day of traffic, for tests and the follow-the-sun demo.
//!
//! Each client region has a UTC offset (its time zone, or its longitude / 15)
//! and a request rate that follows the sun: low at night, peaking in the
//! local afternoon. The day is compressed into a configurable `period` of
//! the caller's clock (a minute, for the demo), and `t = 0` is 00:00 UTC.
//! Everything here is a pure function of time.
//!
//! The daylight curve at local hour `h` is
//!
//! ```text
//! sun(h) = ((1 + cos(2π (h − peak_hour) / 24)) / 2) ^ sharpness      ∈ [0, 1]
//! rate(h) = night_rps + (peak_rps − night_rps) · sun(h)
//! ```
//!
//! with `peak_hour = 14` and `sharpness = 3` by default: full rate at 14:00,
//! about an eighth of it at 08:00 and 20:00, the night floor around 02:00.
//! Rates are in requests per second of the caller's (compressed) clock.

use std::f64::consts::TAU;
use std::time::Duration;

use crate::model::RegionId;
use crate::workload::Workload;

/// The clients of one region.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientRegion {
    /// Where they are.
    pub region: RegionId,
    /// Their time zone, hours east of UTC (`-5` for us-east).
    pub utc_offset_h: f64,
    /// Their rate at the peak of their day, requests per second.
    pub peak_rps: f64,
    /// Their rate at night.
    pub night_rps: f64,
    /// Bytes per request (both directions), for the workload's byte counts.
    pub bytes_per_request: u64,
}

impl ClientRegion {
    /// Clients in `region`, `utc_offset_h` hours east of UTC, peaking at
    /// `peak_rps`, with a night floor of 2% of that and 512 bytes a request.
    pub fn new(region: RegionId, utc_offset_h: f64, peak_rps: f64) -> Self {
        ClientRegion {
            region,
            utc_offset_h,
            peak_rps,
            night_rps: peak_rps * 0.02,
            bytes_per_request: 512,
        }
    }

    /// Clients at a longitude (degrees east): solar time, `longitude / 15`
    /// hours east of UTC.
    pub fn at_longitude(region: RegionId, longitude_deg: f64, peak_rps: f64) -> Self {
        ClientRegion::new(region, longitude_deg / 15.0, peak_rps)
    }

    /// Sets the night rate.
    pub fn with_night_rps(mut self, rps: f64) -> Self {
        self.night_rps = rps;
        self
    }

    /// Sets the bytes per request.
    pub fn with_bytes_per_request(mut self, bytes: u64) -> Self {
        self.bytes_per_request = bytes;
        self
    }
}

/// A compressed day of traffic from several client regions.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticDay {
    /// How long a day lasts on the caller's clock.
    pub period: Duration,
    /// Local hour of the peak (14 by default).
    pub peak_hour: f64,
    /// How narrow the day is (3 by default; 1 is a plain cosine).
    pub sharpness: f64,
    /// The client regions (a region may appear more than once; rates add).
    pub clients: Vec<ClientRegion>,
}

impl SyntheticDay {
    /// A day lasting `period`, with no clients yet.
    ///
    /// # Panics
    /// If `period` is zero.
    pub fn new(period: Duration) -> Self {
        assert!(!period.is_zero(), "a synthetic day needs a non-zero period");
        SyntheticDay {
            period,
            peak_hour: 14.0,
            sharpness: 3.0,
            clients: Vec::new(),
        }
    }

    /// Adds a client region.
    pub fn with_client(mut self, client: ClientRegion) -> Self {
        self.clients.push(client);
        self
    }

    /// The demo's day: clients in us-east (UTC−5), eu-west (UTC+0) and
    /// ap-southeast (UTC+8), each peaking at `peak_rps`.
    pub fn three_regions(
        period: Duration,
        us_east: RegionId,
        eu_west: RegionId,
        ap_southeast: RegionId,
        peak_rps: f64,
    ) -> Self {
        SyntheticDay::new(period)
            .with_client(ClientRegion::new(us_east, -5.0, peak_rps))
            .with_client(ClientRegion::new(eu_west, 0.0, peak_rps))
            .with_client(ClientRegion::new(ap_southeast, 8.0, peak_rps))
    }

    /// The UTC hour (`0..24`) at `t`.
    pub fn utc_hour(&self, t: Duration) -> f64 {
        let day = self.period.as_secs_f64();
        if day <= 0.0 {
            return 0.0;
        }
        (t.as_secs_f64() / day).fract() * 24.0
    }

    /// The `t` at which the first day reaches UTC hour `hour`.
    pub fn at_utc_hour(&self, hour: f64) -> Duration {
        self.period.mul_f64(hour.rem_euclid(24.0) / 24.0)
    }

    /// The local hour (`0..24`) of `client` at `t`.
    pub fn local_hour(&self, client: &ClientRegion, t: Duration) -> f64 {
        (self.utc_hour(t) + client.utc_offset_h).rem_euclid(24.0)
    }

    /// The daylight curve at a local hour, in `[0, 1]`.
    pub fn sun(&self, local_hour: f64) -> f64 {
        let base = (1.0 + (TAU * (local_hour - self.peak_hour) / 24.0).cos()) / 2.0;
        base.clamp(0.0, 1.0).powf(self.sharpness)
    }

    /// The request rate of one client region at `t`, requests per second.
    pub fn client_rate(&self, client: &ClientRegion, t: Duration) -> f64 {
        let sun = self.sun(self.local_hour(client, t));
        client.night_rps + (client.peak_rps - client.night_rps) * sun
    }

    /// The total request rate from `region` at `t`.
    pub fn rate(&self, region: RegionId, t: Duration) -> f64 {
        self.clients
            .iter()
            .filter(|c| c.region == region)
            .map(|c| self.client_rate(c, t))
            .sum()
    }

    /// The client region with the highest rate at `t` (lowest id on a tie).
    pub fn busiest(&self, t: Duration) -> Option<RegionId> {
        let mut best: Option<(RegionId, f64)> = None;
        for c in &self.clients {
            let rate = self.rate(c.region, t);
            let better = match best {
                None => true,
                Some((r, b)) => rate > b || (rate == b && c.region < r),
            };
            if better {
                best = Some((c.region, rate));
            }
        }
        best.map(|(r, _)| r)
    }

    /// Expected requests from `client` in `[from, to]` (Simpson's rule).
    fn requests_between(&self, client: &ClientRegion, from: Duration, to: Duration) -> f64 {
        const STEPS: u32 = 16; // even
        if to <= from {
            return 0.0;
        }
        let h = (to - from) / STEPS;
        let mut sum = self.client_rate(client, from) + self.client_rate(client, to);
        for i in 1..STEPS {
            let w = if i % 2 == 1 { 4.0 } else { 2.0 };
            sum += w * self.client_rate(client, from + h * i);
        }
        sum * h.as_secs_f64() / 3.0
    }

    /// The workload over the interval ending at `t` (`[t − interval, t]`,
    /// clipped at 0): expected requests per client region, rounded, and
    /// bytes at each client's bytes per request.
    pub fn workload(&self, t: Duration, interval: Duration) -> Workload {
        let from = t.saturating_sub(interval);
        let mut w = Workload::new();
        for c in &self.clients {
            let requests = self.requests_between(c, from, t).round() as u64;
            w.add(c.region, requests, requests * c.bytes_per_request);
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(60);

    #[test]
    fn sun_curve_shape() {
        let day = SyntheticDay::new(DAY);
        assert!((day.sun(14.0) - 1.0).abs() < 1e-12);
        assert!(day.sun(2.0) < 1e-12);
        assert!((day.sun(8.0) - 0.125).abs() < 1e-12);
        assert_eq!(day.sun(8.0), day.sun(20.0));
    }

    #[test]
    fn time_zones_shift_the_peak() {
        let (us, eu, ap) = (RegionId(0), RegionId(1), RegionId(2));
        let day = SyntheticDay::three_regions(DAY, us, eu, ap, 100.0);
        // 14:00 local: 06 UTC in ap-southeast, 14 UTC in eu-west, 19 UTC in us-east.
        assert_eq!(day.busiest(day.at_utc_hour(6.0)), Some(ap));
        assert_eq!(day.busiest(day.at_utc_hour(14.0)), Some(eu));
        assert_eq!(day.busiest(day.at_utc_hour(19.0)), Some(us));
        assert!((day.rate(eu, day.at_utc_hour(14.0)) - 100.0).abs() < 1e-9);
        assert!((day.rate(eu, day.at_utc_hour(2.0)) - 2.0).abs() < 1e-9);
        // Periodic: the next day is the same.
        assert_eq!(
            day.rate(us, Duration::from_secs(7)),
            day.rate(us, Duration::from_secs(67))
        );
        assert_eq!(day.local_hour(&day.clients[0], Duration::ZERO), 19.0);
        let c = ClientRegion::at_longitude(ap, 105.0, 1.0);
        assert_eq!(c.utc_offset_h, 7.0);
    }

    #[test]
    fn workload_integrates_the_rate() {
        let eu = RegionId(1);
        let day = SyntheticDay::new(DAY).with_client(
            ClientRegion::new(eu, 0.0, 100.0)
                .with_night_rps(100.0)
                .with_bytes_per_request(10),
        );
        // Constant 100 rps over 2 s.
        let w = day.workload(Duration::from_secs(10), Duration::from_secs(2));
        assert_eq!(w.total_requests(), 200);
        assert_eq!(w.total_bytes(), 2000);
        // Clipped at t = 0.
        let w = day.workload(Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(w.total_requests(), 100);
        // Pure: same inputs, same output.
        assert_eq!(
            day.workload(Duration::from_millis(12_345), Duration::from_secs(3)),
            day.workload(Duration::from_millis(12_345), Duration::from_secs(3))
        );
    }
}
