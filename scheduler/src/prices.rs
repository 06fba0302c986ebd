//! The price feed: what an hour of running costs in each region, and a small
//! parser for the `region,price` CSV the CLI loads (`--prices prices.csv`).
//!
//! The parser takes text, not a path: reading the file is the caller's job,
//! the scheduler does no I/O. Format, one region a line:
//!
//! ```text
//! # comments and blank lines are ignored; the header line is optional
//! region,price
//! us-east,0.096
//! eu-west, 0.107
//! ```
//!
//! Prices are non-negative finite numbers in the feed's currency per hour
//! (the unit is the user's: the [`Cost`](crate::Cost) policy only compares
//! them). Fields are trimmed; quotes are not supported (region names have no
//! commas). A region named twice, a region not in the catalogue, a missing,
//! extra or malformed field is an error naming its line, so a typo in a
//! price file is caught instead of silently ignored.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{RegionId, Regions};

/// Price per hour of each region; dense by [`RegionId`], `None` = no price.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PriceTable {
    per_hour: Vec<Option<f64>>,
}

/// One parsed line of a price CSV.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceRow {
    /// 1-based line number in the text.
    pub line: usize,
    /// The region name as written (trimmed).
    pub region: String,
    /// Price per hour.
    pub price: f64,
}

/// What is wrong with a price CSV, and on which line.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: PriceErrorKind,
}

/// The kinds of [`PriceError`].
#[derive(Clone, Debug, PartialEq)]
pub enum PriceErrorKind {
    /// Fewer than two fields.
    MissingField,
    /// More than two fields.
    ExtraField,
    /// An empty region name.
    EmptyRegion,
    /// The price is not a number.
    BadPrice(String),
    /// The price is negative or not finite.
    InvalidPrice(f64),
    /// The region is not in the catalogue.
    UnknownRegion(String),
    /// The region already has a price in this text.
    Duplicate(String),
}

impl fmt::Display for PriceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "price list line {}: ", self.line)?;
        match &self.kind {
            PriceErrorKind::MissingField => write!(f, "expected `region,price`"),
            PriceErrorKind::ExtraField => write!(f, "more than two fields"),
            PriceErrorKind::EmptyRegion => write!(f, "empty region name"),
            PriceErrorKind::BadPrice(s) => write!(f, "price {s:?} is not a number"),
            PriceErrorKind::InvalidPrice(p) => {
                write!(f, "price {p} must be a non-negative finite number")
            }
            PriceErrorKind::UnknownRegion(r) => write!(f, "unknown region {r:?}"),
            PriceErrorKind::Duplicate(r) => write!(f, "region {r:?} listed twice"),
        }
    }
}

impl std::error::Error for PriceError {}

/// Parses a `region,price` CSV into rows, checking the syntax and the
/// numbers but not the region names (see [`PriceTable::from_csv`]).
pub fn parse_price_csv(text: &str) -> Result<Vec<PriceRow>, PriceError> {
    let mut rows: Vec<PriceRow> = Vec::new();
    let mut seen_data = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let err = |kind| PriceError { line, kind };
        let mut fields = content.split(',').map(str::trim);
        let region = fields.next().unwrap_or_default();
        let price = fields.next().ok_or(err(PriceErrorKind::MissingField))?;
        if fields.next().is_some() {
            return Err(err(PriceErrorKind::ExtraField));
        }
        let first = !seen_data;
        seen_data = true;
        if first && region.eq_ignore_ascii_case("region") && price.eq_ignore_ascii_case("price") {
            continue; // the header
        }
        if region.is_empty() {
            return Err(err(PriceErrorKind::EmptyRegion));
        }
        let price: f64 = price
            .parse()
            .map_err(|_| err(PriceErrorKind::BadPrice(price.to_owned())))?;
        if !(price.is_finite() && price >= 0.0) {
            return Err(err(PriceErrorKind::InvalidPrice(price)));
        }
        if rows.iter().any(|r| r.region == region) {
            return Err(err(PriceErrorKind::Duplicate(region.to_owned())));
        }
        rows.push(PriceRow {
            line,
            region: region.to_owned(),
            price,
        });
    }
    Ok(rows)
}

impl PriceTable {
    /// A table for `n` regions, with no prices.
    pub fn new(n: usize) -> Self {
        PriceTable {
            per_hour: vec![None; n],
        }
    }

    /// Parses a price CSV (see the module doc) against a region catalogue.
    /// Regions the text does not mention have no price.
    pub fn from_csv(text: &str, regions: &Regions) -> Result<Self, PriceError> {
        let mut table = PriceTable::new(regions.len());
        table.update_from_csv(text, regions)?;
        Ok(table)
    }

    /// Applies a feed update: the regions in `text` get their new price,
    /// the others keep theirs. All or nothing: on an error the table is
    /// unchanged. Returns how many prices were set.
    pub fn update_from_csv(&mut self, text: &str, regions: &Regions) -> Result<usize, PriceError> {
        let rows = parse_price_csv(text)?;
        let mut resolved = Vec::with_capacity(rows.len());
        for row in rows {
            let id = regions.id(&row.region).ok_or_else(|| PriceError {
                line: row.line,
                kind: PriceErrorKind::UnknownRegion(row.region.clone()),
            })?;
            resolved.push((id, row.price));
        }
        for &(id, price) in &resolved {
            self.set(id, price);
        }
        Ok(resolved.len())
    }

    /// Sets the price of a region (growing the table if needed). A negative
    /// or non-finite price clears it.
    pub fn set(&mut self, region: RegionId, per_hour: f64) {
        let i = region.index();
        if i >= self.per_hour.len() {
            self.per_hour.resize(i + 1, None);
        }
        self.per_hour[i] = (per_hour.is_finite() && per_hour >= 0.0).then_some(per_hour);
    }

    /// The price per hour of a region, if known.
    #[inline]
    pub fn get(&self, region: RegionId) -> Option<f64> {
        self.per_hour.get(region.index()).copied().flatten()
    }

    /// The cheapest priced region (lowest id on a tie).
    pub fn cheapest(&self) -> Option<(RegionId, f64)> {
        self.per_hour
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (RegionId(i as u32), p)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Regions {
        Regions::new(["us-east", "eu-west", "ap-southeast"])
    }

    #[test]
    fn parses_header_comments_and_spaces() {
        let text = "# spot prices\n\nRegion, Price\nus-east,0.10\n  eu-west , 0.08 \r\n";
        let table = PriceTable::from_csv(text, &regions()).unwrap();
        assert_eq!(table.get(RegionId(0)), Some(0.10));
        assert_eq!(table.get(RegionId(1)), Some(0.08));
        assert_eq!(table.get(RegionId(2)), None);
        assert_eq!(table.cheapest(), Some((RegionId(1), 0.08)));
    }

    #[test]
    fn header_is_optional() {
        let rows = parse_price_csv("us-east,1\n").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].line, 1);
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, PriceErrorKind)] = &[
            ("us-east\n", 1, PriceErrorKind::MissingField),
            ("region,price\nus-east,1,2\n", 2, PriceErrorKind::ExtraField),
            (
                "us-east,cheap\n",
                1,
                PriceErrorKind::BadPrice("cheap".into()),
            ),
            ("us-east,-1\n", 1, PriceErrorKind::InvalidPrice(-1.0)),
            (
                "us-east,inf\n",
                1,
                PriceErrorKind::InvalidPrice(f64::INFINITY),
            ),
            (" ,1\n", 1, PriceErrorKind::EmptyRegion),
            (
                "us-east,1\n# x\nus-east,2\n",
                3,
                PriceErrorKind::Duplicate("us-east".into()),
            ),
            // A header only counts on the first data line.
            (
                "us-east,1\nregion,price\n",
                2,
                PriceErrorKind::BadPrice("price".into()),
            ),
        ];
        for (text, line, kind) in cases {
            let e = parse_price_csv(text).unwrap_err();
            assert_eq!((e.line, &e.kind), (*line, kind), "{text:?}");
        }
        let e = PriceTable::from_csv("us-east,1\nmars,2\n", &regions()).unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.to_string(), "price list line 2: unknown region \"mars\"");
    }

    #[test]
    fn update_is_all_or_nothing() {
        let r = regions();
        let mut table = PriceTable::from_csv("us-east,1\neu-west,2\n", &r).unwrap();
        assert!(table.update_from_csv("us-east,5\nmars,1\n", &r).is_err());
        assert_eq!(table.get(RegionId(0)), Some(1.0));
        assert_eq!(table.update_from_csv("us-east,5\n", &r), Ok(1));
        assert_eq!(table.get(RegionId(0)), Some(5.0));
        assert_eq!(table.get(RegionId(1)), Some(2.0));
    }
}
