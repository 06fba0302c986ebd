//! The guest command line: `lc.host=NAME lc.region=REGION [lc.ip=.. lc.gw=..]
//! KEY=VALUE ... [virtio_mmio.device=SIZE@BASE:IRQ ...] -- ARG ...`.
//!
//! Both backends pass the same string (ours writes it at
//! `abi::layout::CMDLINE_ADDR`, QEMU passes it with `-append`). Rendering
//! and quoting are `abi::cmdline`'s, the same code the guest parses with:
//! a token that is empty or holds whitespace, `"` or `\` is double-quoted
//! with `"` and `\` escaped. This module adds the shim's checks: no NUL
//! bytes, and a length that fits the guest's page.

use abi::cmdline::Cmdline;
use abi::layout::CMDLINE_MAX;

use crate::error::CmdlineError;

/// Who the guest is and what it should run.
#[derive(Clone, Debug, Default)]
pub struct GuestArgs {
    /// `lc.host`: the name of the host the guest runs on.
    pub host_name: String,
    /// `lc.region`: the region of that host.
    pub region: String,
    /// The shim's own `lc.*` parameters (network addresses), in order.
    pub params: Vec<(String, String)>,
    /// Environment entries, in order.
    pub env: Vec<(String, String)>,
    /// virtio-mmio devices (`SIZE@BASE:IRQ`).
    pub devices: Vec<String>,
    /// Arguments of the app, after `--`.
    pub args: Vec<String>,
}

/// Longest command line, without its NUL.
pub const MAX_LEN: usize = CMDLINE_MAX as usize - 1;

/// Builds the command line (without the terminating NUL).
pub fn build(guest: &GuestArgs) -> Result<String, CmdlineError> {
    let words = [&guest.host_name, &guest.region]
        .into_iter()
        .chain(guest.params.iter().flat_map(|(k, v)| [k, v]))
        .chain(guest.env.iter().flat_map(|(k, v)| [k, v]))
        .chain(&guest.args);
    for word in words {
        if word.contains('\0') {
            return Err(CmdlineError::Nul {
                what: format!("'{}'", word.escape_debug()),
            });
        }
    }
    let line = Cmdline {
        host: Some(guest.host_name.clone()),
        region: Some(guest.region.clone()),
        params: guest.params.clone(),
        env: guest.env.clone(),
        virtio_mmio: guest.devices.clone(),
        args: guest.args.clone(),
    }
    .render();
    if line.len() > MAX_LEN {
        return Err(CmdlineError::TooLong {
            len: line.len(),
            max: MAX_LEN,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi::cmdline::{quote, split};

    fn guest(env: &[(&str, &str)], args: &[&str]) -> GuestArgs {
        GuestArgs {
            host_name: "h1".into(),
            region: "local".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..GuestArgs::default()
        }
    }

    #[test]
    fn plain_tokens() {
        let line = build(&guest(&[("A", "1"), ("B", "x")], &["serve", "--port=80"])).unwrap();
        assert_eq!(
            line,
            "lc.host=h1 lc.region=local A=1 B=x -- serve --port=80"
        );
    }

    #[test]
    fn network_parameters_and_devices() {
        let mut g = guest(&[("A", "1")], &["x"]);
        g.params = vec![
            ("lc.ip".into(), "10.0.2.15/24".into()),
            ("lc.gw".into(), "10.0.2.2".into()),
        ];
        g.devices = vec!["0x200@0xc0001000:5".into()];
        let line = build(&g).unwrap();
        assert_eq!(
            line,
            "lc.host=h1 lc.region=local lc.ip=10.0.2.15/24 lc.gw=10.0.2.2 A=1 \
             virtio_mmio.device=0x200@0xc0001000:5 -- x"
        );
        let parsed = Cmdline::parse(&line);
        assert_eq!(parsed.param("lc.ip"), Some("10.0.2.15/24"));
        assert_eq!(parsed.virtio_mmio, ["0x200@0xc0001000:5"]);
        assert_eq!(parsed.env, [("A".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn no_env_no_args() {
        assert_eq!(
            build(&guest(&[], &[])).unwrap(),
            "lc.host=h1 lc.region=local --"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("abc"), "abc");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a\tb"), "\"a\tb\"");
        assert_eq!(quote("say \"hi\""), r#""say \"hi\"""#);
        assert_eq!(quote(r"C:\dir"), r#""C:\\dir""#);
        let line = build(&guest(
            &[("MSG", "hello world")],
            &["a b", "", "x\"y", r"\"],
        ))
        .unwrap();
        assert_eq!(
            line,
            r#"lc.host=h1 lc.region=local "MSG=hello world" -- "a b" "" "x\"y" "\\""#
        );
        assert_eq!(
            split(&line),
            [
                "lc.host=h1",
                "lc.region=local",
                "MSG=hello world",
                "--",
                "a b",
                "",
                "x\"y",
                "\\"
            ]
        );
    }

    #[test]
    fn the_guest_parser_gets_everything_back() {
        let g = GuestArgs {
            host_name: "my host".into(),
            region: "eu \"west\"".into(),
            env: vec![
                ("GREETING".into(), "hello there".into()),
                ("EMPTY".into(), "".into()),
            ],
            args: [
                "plain",
                "with space",
                "quote\"d",
                "back\\slash",
                "",
                "--",
                "K=V",
            ]
            .map(String::from)
            .to_vec(),
            ..GuestArgs::default()
        };
        let parsed = Cmdline::parse(&build(&g).unwrap());
        assert_eq!(parsed.host.as_deref(), Some("my host"));
        assert_eq!(parsed.region.as_deref(), Some("eu \"west\""));
        assert_eq!(parsed.env, g.env);
        assert_eq!(parsed.args, g.args);
    }

    #[test]
    fn host_names_with_spaces_survive() {
        let mut g = guest(&[], &[]);
        g.host_name = "my host".into();
        assert_eq!(split(&build(&g).unwrap())[0], "lc.host=my host");
    }

    #[test]
    fn length_limit() {
        let base = build(&guest(&[], &[])).unwrap().len();
        // " " + the argument brings the line to exactly MAX_LEN.
        let fits = "x".repeat(MAX_LEN - base - 1);
        assert_eq!(build(&guest(&[], &[&fits])).unwrap().len(), MAX_LEN);
        let too_long = "x".repeat(MAX_LEN - base);
        assert_eq!(
            build(&guest(&[], &[&too_long])),
            Err(CmdlineError::TooLong {
                len: MAX_LEN + 1,
                max: MAX_LEN
            })
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(matches!(
            build(&guest(&[("A", "x\0y")], &[])),
            Err(CmdlineError::Nul { .. })
        ));
    }
}
