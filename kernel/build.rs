//! Relinks images when the linker script changes.
fn main() {
    println!("cargo:rerun-if-changed=link.ld");
}
