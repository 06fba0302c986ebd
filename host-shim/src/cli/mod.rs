//! The `host-shim` binary's command modules: they parse nothing (clap does,
//! in `main.rs`) and render what the libraries return.

pub mod fleet;
