//! A real etcd for the tests (Debian's `etcd-server`): one member or a
//! cluster on free loopback ports with scratch data directories, over
//! plain HTTP or TLS with client certificates; killed when dropped.

use super::daemon::TempDir;
use super::free_port;
use fleet::store;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An etcd cluster on loopback (one member for most tests), each member
/// with its own ports and data directory; killed when dropped.
pub struct Etcd {
    members: Vec<Member>,
    /// How clients reach it (TLS files when it serves TLS).
    access: store::Access,
    /// etcdctl's flags for that.
    ctl_flags: Vec<String>,
}

/// The certificates of an etcd that serves clients over TLS and checks
/// their certificates: a CA, the members' certificate (for 127.0.0.1),
/// a client certificate, and another CA that signed none of them.
pub struct Certs {
    pub ca: std::path::PathBuf,
    pub server: (std::path::PathBuf, std::path::PathBuf),
    pub client: (std::path::PathBuf, std::path::PathBuf),
    pub other_ca: std::path::PathBuf,
}

impl Certs {
    pub fn generate(dir: &TempDir) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let write = |name: &str, pem: String| {
            let path = dir.path(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("test etcd CA");
        let (other_pem, _) = ca("another CA");
        let leaf = |cn: &str, sans: Vec<String>| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf("etcd", vec!["127.0.0.1".into(), "localhost".into()]);
        let (client, client_key) = leaf("host-shim", vec![]);
        Self {
            ca: write("ca.pem", ca_pem),
            server: (write("server.pem", server), write("server.key", server_key)),
            client: (write("client.pem", client), write("client.key", client_key)),
            other_ca: write("other-ca.pem", other_pem),
        }
    }
}

struct Member {
    name: String,
    endpoint: String,
    args: Vec<String>,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Etcd {
    pub fn start(dir: &TempDir) -> Self {
        Self::cluster(dir, 1)
    }

    /// `n` members forming one cluster, ready when a client's round trip
    /// through all of them succeeds.
    pub fn cluster(dir: &TempDir, n: usize) -> Self {
        Self::cluster_with(dir, n, None)
    }

    /// One member serving clients over TLS with `certs`, checking their
    /// certificates (`--client-cert-auth`).
    pub fn start_tls(dir: &TempDir, certs: &Certs) -> Self {
        Self::cluster_with(dir, 1, Some(certs))
    }

    fn cluster_with(dir: &TempDir, n: usize, tls: Option<&Certs>) -> Self {
        if Command::new("etcd").arg("--version").output().is_err() {
            panic!(
                "this test needs a real etcd on PATH: apt-get install etcd-server etcd-client \
                 (`cargo xtask test` installs it)"
            );
        }
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let name = format!("m{i}");
                let endpoint = format!("127.0.0.1:{client}");
                let data = dir.path(&format!("{name}.etcd"));
                let scheme = if tls.is_some() { "https" } else { "http" };
                let mut args = [
                    "--name",
                    &name,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen-client-urls",
                    &format!("{scheme}://{endpoint}"),
                    "--advertise-client-urls",
                    &format!("{scheme}://{endpoint}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                ]
                .map(str::to_owned)
                .to_vec();
                if let Some(c) = tls {
                    args.extend(["--client-cert-auth".to_owned(), "--trusted-ca-file".into()]);
                    args.push(c.ca.display().to_string());
                    args.extend(["--cert-file".to_owned(), c.server.0.display().to_string()]);
                    args.extend(["--key-file".to_owned(), c.server.1.display().to_string()]);
                }
                Member {
                    log: dir.path(&format!("{name}.log")),
                    name,
                    endpoint,
                    args,
                    child: None,
                }
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        let (access, ctl_flags) = match tls {
            Some(c) => (
                store::Access {
                    ca: Some(c.ca.clone()),
                    cert: Some(c.client.0.clone()),
                    key: Some(c.client.1.clone()),
                    ..Default::default()
                },
                [
                    ("--cacert", &c.ca),
                    ("--cert", &c.client.0),
                    ("--key", &c.client.1),
                ]
                .iter()
                .map(|(flag, path)| format!("{flag}={}", path.display()))
                .collect(),
            ),
            None => Default::default(),
        };
        let mut etcd = Self {
            members,
            access,
            ctl_flags,
        };
        etcd.wait_ready();
        etcd
    }

    pub fn wait_ready(&mut self) {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            let all_answer = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                store::open_with(&format!("etcd://{}", m.endpoint), &self.access)
                    .and_then(|s| s.list("none/"))
                    .is_ok()
            });
            if all_answer {
                return;
            }
            for m in &mut self.members {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    panic!("etcd {} exited ({status}):\n{}", m.name, m.output());
                }
            }
            assert!(
                Instant::now() < give_up,
                "etcd never answered:\n{}",
                self.members.iter().map(Member::output).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The store URL naming every member.
    pub fn url(&self) -> String {
        let endpoints: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        format!("etcd://{}", endpoints.join(","))
    }

    /// Stops member `i` (kill -9).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.members[i].spawn();
    }

    /// `etcdctl ARGS` against the first member (a real client besides ours).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.members[0].endpoint])
            .args(&self.ctl_flags)
            .args(args)
            .output()
            .expect("etcdctl (apt-get install etcd-client)")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}
