//! Writes every target's seeds (`host_shim_fuzz::seeds`) to `DIR/<target>/seed-<name>`
//! (default `fuzz/corpus`), replacing earlier seeds; inputs libFuzzer added stay.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus"),
        PathBuf::from,
    );
    for (target, _) in host_shim_fuzz::TARGETS {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        for (name, bytes) in host_shim_fuzz::seeds::seeds(target) {
            std::fs::write(target_dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    println!("{}", dir.display());
    Ok(())
}
