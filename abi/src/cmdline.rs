//! The guest command line: how the shim says who the guest is, what its
//! environment and arguments are, and where its devices live.
//!
//! ```text
//! lc.host=NAME lc.region=REGION KEY=VALUE ... virtio_mmio.device=SIZE@BASE:IRQ ... -- ARG ARG ...
//! ```
//!
//! Tokens are separated by spaces; a token holding spaces, tabs, newlines or
//! `"` is written in double quotes with `\"` and `\\` escapes. Before `--`,
//! `lc.*` keys are the shim's (host, region, and parameters such as the
//! network's `lc.ip=ADDR/PREFIX` and `lc.gw=ADDR`), `virtio_mmio.device=` entries are devices
//! (Linux's syntax, also appended by QEMU microvm, even after `--`), and any
//! other `KEY=VALUE` is the app's environment, except [`MONITOR_PARAMS`]
//! (kernel parameters a monitor adds). Words after `--` are the app's
//! arguments.

use alloc::string::String;
use alloc::vec::Vec;

/// Key of the host's name.
pub const HOST_KEY: &str = "lc.host";
/// Key of the host's region.
pub const REGION_KEY: &str = "lc.region";
/// Prefix of the shim's own keys.
pub const PARAM_PREFIX: &str = "lc.";
/// The guest's IPv4 address and prefix length (`10.0.2.15/24`).
pub const IP_KEY: &str = "lc.ip";
/// The guest's IPv4 gateway.
pub const GATEWAY_KEY: &str = "lc.gw";
/// Take an app checkpoint every this many milliseconds (abi::checkpoint).
pub const CHECKPOINT_EVERY_KEY: &str = "lc.checkpoint_every";
/// Key prefix of a virtio-mmio device (`SIZE@BASE:IRQ`).
pub const VIRTIO_MMIO_KEY: &str = "virtio_mmio.device";

/// Kernel parameters monitors add before `--` (Firecracker: `pci=off`);
/// they are not the app's environment.
pub const MONITOR_PARAMS: &[&str] = &["pci=off"];

/// A parsed command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub host: Option<String>,
    pub region: Option<String>,
    /// Other `lc.*` keys, with their full names.
    pub params: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    pub virtio_mmio: Vec<String>,
    pub args: Vec<String>,
}

impl Cmdline {
    /// Parses a command line; never fails (unknown words are ignored).
    pub fn parse(line: &str) -> Self {
        let mut out = Cmdline::default();
        let mut in_args = false;
        for token in split(line) {
            let kv = token.split_once('=');
            match kv {
                Some((VIRTIO_MMIO_KEY, v)) => out.virtio_mmio.push(v.into()),
                _ if in_args => out.args.push(token),
                None if token == "--" => in_args = true,
                _ if MONITOR_PARAMS.contains(&token.as_str()) => {}
                Some((HOST_KEY, v)) => out.host = Some(v.into()),
                Some((REGION_KEY, v)) => out.region = Some(v.into()),
                Some((k, v)) if k.starts_with(PARAM_PREFIX) => {
                    out.params.push((k.into(), v.into()))
                }
                Some((k, v)) if !k.is_empty() => out.env.push((k.into(), v.into())),
                _ => {}
            }
        }
        out
    }

    /// Renders the command line (the inverse of [`Cmdline::parse`]).
    pub fn render(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        let mut kv = |k: &str, v: &str| words.push(quote(&alloc::format!("{k}={v}")));
        if let Some(h) = &self.host {
            kv(HOST_KEY, h);
        }
        if let Some(r) = &self.region {
            kv(REGION_KEY, r);
        }
        for (k, v) in self.params.iter().chain(&self.env) {
            kv(k, v);
        }
        for d in &self.virtio_mmio {
            kv(VIRTIO_MMIO_KEY, d);
        }
        words.push("--".into());
        words.extend(self.args.iter().map(|a| quote(a)));
        words.join(" ")
    }

    /// The value of shim parameter `key` (e.g. [`IP_KEY`]).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of environment variable `key`.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Quotes one word so that [`split`] gives it back unchanged.
pub fn quote(word: &str) -> String {
    let plain =
        !word.is_empty() && !word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\');
    if plain {
        return word.into();
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Splits a command line into words, undoing [`quote`].
pub fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut started = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(core::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn round_trips_awkward_words() {
        let c = Cmdline {
            host: Some("us-east".into()),
            region: Some("us east 1".into()),
            params: vec![(IP_KEY.into(), "10.0.2.15/24".into())],
            env: vec![
                ("GREETING".into(), "hi \"there\"".into()),
                ("EMPTY".into(), "".into()),
            ],
            virtio_mmio: vec!["512@0xc0001000:5".into()],
            args: vec![
                "--name".into(),
                "".into(),
                "a\\b c".into(),
                "--".into(),
                "x=y".into(),
            ],
        };
        assert_eq!(Cmdline::parse(&c.render()), c);
    }

    #[test]
    fn devices_after_the_separator_are_not_args() {
        let c = Cmdline::parse("-- hello virtio_mmio.device=512@0xfeb00e00:12");
        assert_eq!(c.args, vec!["hello"]);
        assert_eq!(c.virtio_mmio, vec!["512@0xfeb00e00:12"]);
    }

    #[test]
    fn what_firecracker_adds_is_neither_env_nor_args() {
        // Firecracker inserts its parameters before ` -- `.
        let c =
            Cmdline::parse("lc.host=a K=V pci=off virtio_mmio.device=4K@0xc0001000:5 -- pci=off");
        assert_eq!(c.env, vec![("K".into(), "V".into())]);
        assert_eq!(c.args, vec!["pci=off"]);
        assert_eq!(c.virtio_mmio, vec!["4K@0xc0001000:5"]);
    }

    #[test]
    fn env_and_host_are_read() {
        let c = Cmdline::parse("  lc.host=a   K=V noise  ");
        assert_eq!(c.host.as_deref(), Some("a"));
        assert_eq!(c.env("K"), Some("V"));
        assert!(c.args.is_empty());
    }
}
