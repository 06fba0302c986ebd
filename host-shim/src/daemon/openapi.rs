//! The API's OpenAPI 3 description (`host-shim/api/openapi.yaml`), served
//! at `GET /v1/openapi.yaml`, and the test that keeps it in step with the
//! routes of [`super::Daemon::handle`].

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes matched in `Daemon::handle`, read from its source:
    /// arms like `(Method::Get | Method::Head, ["v1", "images", hash])`.
    fn routes() -> Vec<String> {
        let handle = include_str!("mod.rs");
        let start = handle.find("fn handle(").expect("Daemon::handle");
        let standby = include_str!("standby.rs");
        let route = standby.find("pub fn route(").expect("standby::route");
        let mut out = Vec::new();
        let arms = handle[start..].split("(Method::").skip(1);
        for arm in arms.chain(standby[route..].split("(Method::").skip(1)) {
            let Some((methods, rest)) = arm.split_once(", [") else {
                continue;
            };
            let Some((segments, _)) = rest.split_once(']') else {
                continue;
            };
            let path: String = segments
                .split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(
                    |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                        Some(lit) => format!("/{lit}"),
                        None => format!("/{{{s}}}"),
                    },
                )
                .collect();
            for m in methods.split('|') {
                let m = m.trim().trim_start_matches("Method::").to_lowercase();
                out.push(format!("{m} {path}"));
            }
        }
        out
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
            "routes of Daemon::handle missing from host-shim/api/openapi.yaml: {missing:?}"
        );
        // The one route served outside `handle` (the migration stream).
        assert!(documented.contains(&"post /v1/migration".to_owned()));
    }
}
