//! The API's OpenAPI 3 description (`api/openapi.yaml`), served
//! at `GET /v1/openapi.yaml`, and the tests that keep it in step with the
//! route table ([`api::routes::ROUTES`]; each route with its 401 and 403 answers)
//! and, field by field, with the `api` crate's types.

use std::collections::{BTreeMap, BTreeSet};

/// The document.
pub const OPENAPI: &str = include_str!("../../api/openapi.yaml");

/// The operations (`get /v1/instances/{name}/logs`, ...) the document describes.
pub fn operations(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut path: Option<&str> = None;
    for line in doc.lines() {
        if !line.starts_with(' ') {
            path = None;
            if line != "paths:" {
                continue;
            }
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(p);
        } else if let (Some(p), Some(method)) = (
            path,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) {
            if !method.starts_with(' ') && method != "parameters" {
                out.push(format!("{method} /{p}"));
            }
        }
    }
    out
}

/// The properties of each schema of `components.schemas` that has any.
pub fn schemas(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut in_schemas, mut schema, mut in_props) = (false, None::<String>, false);
    for line in doc.lines() {
        if !line.starts_with(' ') {
            in_schemas = false;
        }
        if line == "  schemas:" {
            in_schemas = true;
            continue;
        }
        if !in_schemas {
            continue;
        }
        if let Some(name) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                schema = Some(name.to_owned());
                in_props = false;
                continue;
            }
        }
        if line.starts_with("      ") && !line.starts_with("       ") {
            in_props = line == "      properties:";
            continue;
        }
        let (Some(schema), true) = (&schema, in_props) else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("        ") {
            if let Some((key, _)) = rest.split_once(':').filter(|_| !rest.starts_with(' ')) {
                out.entry(schema.clone())
                    .or_default()
                    .insert(key.to_owned());
            }
        }
    }
    out
}

/// The answer codes of each operation (`post /v1/instances` -> 201, 400, ...).
pub fn responses(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut path, mut op, mut in_responses) = (None::<String>, None::<String>, false);
    let mut in_paths = false;
    for line in doc.lines() {
        if !line.starts_with(' ') {
            (path, op) = (None, None);
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().strip_suffix(':');
        if let (2, Some(p)) = (indent, key) {
            path = Some(p.to_owned());
            op = None;
        } else if let (4, Some(m)) = (indent, key) {
            op = path.as_ref().map(|p| format!("{m} {p}"));
        } else if indent == 6 {
            in_responses = line == "      responses:";
        } else if let (Some(op), true) = (&op, in_responses) {
            if let Some(code) = line
                .strip_prefix("        \"")
                .and_then(|l| l.split_once('"'))
                .map(|(c, _)| c)
            {
                out.entry(op.clone()).or_default().insert(code.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes of the API's route table (`get /v1/instances/{name}/logs`, ...).
    fn routes() -> Vec<String> {
        api::routes::ROUTES
            .iter()
            .flat_map(|r| {
                r.methods
                    .iter()
                    .map(move |m| format!("{} {}", m.to_string().to_lowercase(), r.path))
            })
            .collect()
    }

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let routes = routes();
        assert!(routes.len() >= 15, "the route parser found {routes:?}");
        assert!(routes.contains(&"get /v1/instances/{name}/logs".to_owned()));
        let documented = operations(OPENAPI);
        let missing: Vec<&String> = routes.iter().filter(|r| !documented.contains(r)).collect();
        assert!(
            missing.is_empty(),
            "routes of api::routes::ROUTES missing from api/openapi.yaml: {missing:?}"
        );
        // And nothing documented that is not routed.
        let extra: Vec<&String> = documented.iter().filter(|d| !routes.contains(d)).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }
}

#[cfg(test)]
mod fields {
    //! Every documented schema against the JSON of the type it describes.
    use super::*;
    use crate::images::ImageInfo;
    use crate::standby::StandbyInfo;
    use api::stats::{InstanceStats, NicStats, PeerRtt, PortStats, ShimStats};
    use api::*;
    use serde::Serialize;
    use serde_json::Value;

    fn keys(samples: &[Value]) -> BTreeSet<String> {
        samples
            .iter()
            .flat_map(|v| v.as_object().expect("an object").keys().cloned())
            .collect()
    }

    fn json<T: Serialize>(v: T) -> Value {
        serde_json::to_value(v).unwrap()
    }

    /// The values (of every variant) each documented schema describes.
    fn samples() -> BTreeMap<&'static str, Vec<Value>> {
        let states = [
            InstanceState::Running,
            InstanceState::Busy {
                what: "migrating".into(),
            },
            InstanceState::Exited {
                how: "status 0".into(),
            },
            InstanceState::Moved {
                to: "127.0.0.1:7100".into(),
            },
        ];
        let info = |state: &InstanceState| {
            json(InstanceInfo {
                state: state.clone(),
                ..InstanceInfo::default()
            })
        };
        let stats = |state: &InstanceState| {
            json(InstanceStats {
                state: state.clone(),
                ..InstanceStats::default()
            })
        };
        let events = [
            MigrationEvent::Started {
                name: "kv".into(),
                mem: 1,
                from: "a".into(),
                to_name: "b".into(),
                to: "b:1".into(),
                region: "r".into(),
            },
            MigrationEvent::Round {
                round: 0,
                dirty: 1,
                pages: 1,
                bytes: 1,
                catch_up: false,
                skipped: None,
            },
            MigrationEvent::Paused {
                dirty: 1,
                bytes: 1,
                skipped: Some(1),
            },
            MigrationEvent::Note {
                message: "m".into(),
            },
            MigrationEvent::Running {
                name: "kv".into(),
                on: "b".into(),
                downtime_ms: 1.0,
                restore_ms: None,
            },
            MigrationEvent::Timeline {
                marks: vec![("paused".into(), 1.0)],
                hints_ms: 0.0,
            },
            MigrationEvent::Done(MigrationReport::default()),
            MigrationEvent::Failed {
                phase: MigrationPhase::Connect,
                error: "e".into(),
            },
        ];
        let health = Health {
            ok: true,
            version: "1".into(),
            uptime_s: 0.0,
        };
        let log = LogEvent {
            line: Some("l".into()),
            moved_to: Some("m".into()),
            end: Some("e".into()),
        };
        BTreeMap::from([
            ("Error", vec![json(ErrorBody { error: "e".into() })]),
            ("Health", vec![json(health)]),
            ("ShimInfo", vec![json(ShimInfo::default())]),
            ("Limits", vec![json(Limits::default())]),
            ("AddressUse", vec![json(api::AddressUse::default())]),
            ("ShimStats", vec![json(ShimStats::default())]),
            ("InstanceStats", states.iter().map(stats).collect()),
            ("NicStats", vec![json(NicStats::default())]),
            ("PortStats", vec![json(PortStats::default())]),
            ("PeerRtt", vec![json(PeerRtt::default())]),
            ("InstanceInfo", states.iter().map(info).collect()),
            ("RunRequest", vec![json(RunRequest::default())]),
            ("RestartRequest", vec![json(RestartRequest::default())]),
            ("PushRequest", vec![json(PushRequest::default())]),
            ("RestoreRequest", vec![json(RestoreRequest::default())]),
            ("SnapshotRequest", vec![json(SnapshotRequest::default())]),
            ("SnapshotInfo", vec![json(SnapshotInfo::default())]),
            (
                "CheckpointRequest",
                vec![json(CheckpointRequest::default())],
            ),
            ("CheckpointInfo", vec![json(CheckpointInfo::default())]),
            ("MigrateRequest", vec![json(MigrateRequest::default())]),
            ("PublishSpec", vec![json(parse_publish("1:2").unwrap())]),
            ("ImageInfo", vec![json(ImageInfo::default())]),
            ("LogEvent", vec![json(log)]),
            ("MigrationEvent", events.iter().map(json).collect()),
            ("StandbyInfo", vec![json(StandbyInfo::default())]),
            (
                "StandbyRequest",
                vec![json(crate::standby::StandbyRequest {
                    origin: "a:1".into(),
                    run: RunRequest::default(),
                    image: vmm::snapshot::state::ImageId {
                        path: "kv.img".into(),
                        size: 1,
                        sha256: "00".into(),
                    },
                    grace_ms: 1,
                })],
            ),
        ])
    }

    #[test]
    fn every_schema_names_exactly_the_fields_of_its_type() {
        let documented = schemas(OPENAPI);
        assert!(
            documented.len() >= 20,
            "the schema parser found {documented:?}"
        );
        let samples = samples();
        let mut drift = Vec::new();
        for (name, props) in &documented {
            let Some(values) = samples.get(name.as_str()) else {
                drift.push(format!(
                    "{name}: documented, but no API type is checked against it"
                ));
                continue;
            };
            let fields = keys(values);
            let missing: Vec<_> = fields.difference(props).collect();
            let extra: Vec<_> = props.difference(&fields).collect();
            if !missing.is_empty() || !extra.is_empty() {
                drift.push(format!(
                    "{name}: undocumented {missing:?}, no such field {extra:?}"
                ));
            }
        }
        for name in samples.keys() {
            if !documented.contains_key(*name) {
                drift.push(format!("{name}: not in the document"));
            }
        }
        assert!(
            drift.is_empty(),
            "api/openapi.yaml drifted from the API types:\n{}",
            drift.join("\n")
        );
    }

    #[test]
    fn every_operation_but_health_declares_the_bearer_refusals() {
        assert!(OPENAPI
            .contains("securitySchemes:\n    bearer:\n      type: http\n      scheme: bearer"));
        assert!(OPENAPI.contains("\nsecurity:\n  - bearer: []\n"));
        let answers = responses(OPENAPI);
        assert_eq!(answers.len(), operations(OPENAPI).len(), "{answers:?}");
        for (op, codes) in &answers {
            if op == "get /v1/health" {
                assert!(!codes.contains("401"), "{op}: {codes:?}");
                continue;
            }
            for code in ["401", "403"] {
                assert!(
                    codes.contains(code),
                    "{op} does not declare {code}: {codes:?}"
                );
            }
        }
    }
}
