//! Getting an image ready to run: validating and loading it (`loader`),
//! keeping the images booted lately in memory (`image_cache`),
//! building its command line (`cmdline`), laying out the boot-time guest
//! memory (`layout`) and the first vCPU state (`cpu`).

pub mod cmdline;
pub mod cpu;
pub mod image_cache;
pub mod layout;
pub mod loader;
