//! The demo's figures derived from the measured requests: what a placement
//! would have given for the same traffic (the best static region and the
//! ideal placement, from per-tick per-region request counts and the
//! configured delays), and the longest wait for a reply that clients saw
//! in a time window (around a move, or in a quiet window for a baseline).
//!
//! The counterfactual placements count a request as under the bound when
//! the round trip between its region and the app's alone is
//! (`2 x one-way <= bound`): in-region service is taken as free, so these
//! rows are upper bounds, never handicapped against the measured run.

use super::fleet::one_way_ms;
use super::load::Sample;
use super::BOUND_MS;

/// (under the bound, all) per client region.
pub type Shares = Vec<(usize, usize)>;

/// Whether a request from region `client` can be answered under the bound
/// by the app in region `app`.
fn reachable(client: usize, app: usize) -> bool {
    2.0 * one_way_ms(client, app) <= BOUND_MS
}

/// The shares had the app stayed in region `app` all along.
pub fn static_placement(samples: &[Sample], regions: usize, app: usize) -> Shares {
    let mut out = vec![(0, 0); regions];
    for s in samples.iter().filter(|s| s.region < regions) {
        out[s.region].1 += 1;
        if reachable(s.region, app) {
            out[s.region].0 += 1;
        }
    }
    out
}

/// Requests under the bound overall.
pub fn under(shares: &Shares) -> usize {
    shares.iter().map(|s| s.0).sum()
}

/// The best static region for this traffic and its shares.
pub fn best_static(samples: &[Sample], regions: usize) -> (usize, Shares) {
    (0..regions)
        .map(|r| (r, static_placement(samples, regions, r)))
        .max_by_key(|(_, s)| under(s))
        .unwrap_or((0, vec![(0, 0); regions]))
}

/// The ideal placement: for every tick of `tick_s` seconds (by when the
/// requests were due), the app in the region that serves most of that
/// tick's requests under the bound, moved there instantly and for free.
pub fn oracle(samples: &[Sample], regions: usize, tick_s: f64) -> Shares {
    let tick_s = tick_s.max(1e-3);
    let mut ticks: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
    for s in samples.iter().filter(|s| s.region < regions) {
        let t = (s.due_s.max(0.0) / tick_s) as u64;
        ticks.entry(t).or_insert_with(|| vec![0; regions])[s.region] += 1;
    }
    let mut out = vec![(0, 0); regions];
    for counts in ticks.values() {
        let served = |app: usize| -> usize {
            (0..regions)
                .filter(|&c| reachable(c, app))
                .map(|c| counts[c])
                .sum()
        };
        let best = (0..regions).max_by_key(|&app| served(app)).unwrap_or(0);
        for (c, n) in counts.iter().enumerate() {
            out[c].1 += n;
            if reachable(c, best) {
                out[c].0 += n;
            }
        }
    }
    out
}

/// A stretch of time in which a client waited for a reply: from when its
/// request was due (or its previous reply came, if later) to the reply.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stall {
    pub region: usize,
    pub begin_s: f64,
    pub end_s: f64,
}

/// Every client's stalls (a connection answers in order).
pub fn stalls(samples: &[Sample]) -> Vec<Stall> {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by(|a, b| a.region.cmp(&b.region).then(a.due_s.total_cmp(&b.due_s)));
    let mut out = Vec::with_capacity(sorted.len());
    let mut prev: Option<(usize, f64)> = None;
    for s in sorted {
        let begin = match prev {
            Some((r, reply)) if r == s.region => s.due_s.max(reply),
            _ => s.due_s,
        };
        let end = s.reply_s();
        out.push(Stall {
            region: s.region,
            begin_s: begin.min(end),
            end_s: end,
        });
        prev = Some((s.region, end));
    }
    out
}

/// The longest stall (ms) that overlaps `[from_s, to_s]`, and whose it was.
pub fn gap(stalls: &[Stall], from_s: f64, to_s: f64) -> Option<(f64, usize)> {
    stalls
        .iter()
        .filter(|s| s.end_s >= from_s && s.begin_s <= to_s)
        .map(|s| ((s.end_s - s.begin_s) * 1e3, s.region))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// The longest stall (ms) that overlaps `[from_s, to_s]` (0 without one).
pub fn gap_ms(stalls: &[Stall], from_s: f64, to_s: f64) -> f64 {
    gap(stalls, from_s, to_s).map_or(0.0, |g| g.0)
}

/// The median of the longest stall over the windows of `len_s` seconds
/// that tile `[0, until_s]` and overlap none of `busy` (the moves), and how
/// many windows there were; `None` without such a window.
pub fn baseline_gap_ms(
    stalls: &[Stall],
    busy: &[(f64, f64)],
    len_s: f64,
    until_s: f64,
) -> Option<(f64, usize)> {
    let len_s = len_s.max(0.1);
    let mut gaps = Vec::new();
    let mut from = 0.0;
    while from + len_s <= until_s {
        let to = from + len_s;
        if !busy.iter().any(|&(b0, b1)| b1 >= from && b0 <= to) {
            gaps.push(gap_ms(stalls, from, to));
        }
        from = to;
    }
    median(&mut gaps).map(|m| (m, gaps.len()))
}

/// The median (mean of the two middle values for an even count).
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(region: usize, due_s: f64, latency_ms: f64) -> Sample {
        Sample {
            region,
            due_s,
            latency_ms,
        }
    }

    #[test]
    fn the_oracle_follows_the_busiest_region_and_static_keeps_one() {
        // Tick 0: region 0 sends 3, region 1 sends 1; tick 1: 0 sends 1, 1 sends 4.
        let mut s = Vec::new();
        for i in 0..3 {
            s.push(sample(0, 0.1 * i as f64, 1.0));
        }
        s.push(sample(1, 0.5, 1.0));
        s.push(sample(0, 1.2, 1.0));
        for i in 0..4 {
            s.push(sample(1, 1.1 + 0.1 * i as f64, 1.0));
        }
        let (best, shares) = best_static(&s, 3);
        assert_eq!(best, 1);
        assert_eq!(shares, vec![(0, 4), (5, 5), (0, 0)]);
        let o = oracle(&s, 3, 1.0);
        assert_eq!(o, vec![(3, 4), (4, 5), (0, 0)]);
        assert_eq!(under(&o), 7);
    }

    #[test]
    fn a_gap_is_the_longest_wait_and_the_baseline_skips_moves() {
        // One client, a reply every 100 ms taking 2 ms, but a request due at
        // 5.0 s answered at 5.5 s and the next two queued behind it.
        let mut s: Vec<Sample> = (0..100)
            .map(|i| sample(0, i as f64 * 0.1, 2.0))
            .filter(|x| !(5.0..5.3).contains(&x.due_s))
            .collect();
        s.push(sample(0, 5.0, 500.0));
        s.push(sample(0, 5.1, 401.0));
        s.push(sample(0, 5.2, 302.0));
        let st = stalls(&s);
        let g = gap_ms(&st, 4.9, 5.6);
        assert!((g - 500.0).abs() < 1e-6, "{g}");
        // The queued ones waited only for their own reply after the first.
        assert!(gap_ms(&st, 5.55, 5.6) < 5.0);
        let (base, windows) = baseline_gap_ms(&st, &[(4.9, 5.6)], 1.0, 10.0).unwrap();
        assert!((base - 2.0).abs() < 1e-6, "{base}");
        assert_eq!(windows, 8);
    }
}
