//! Getting an image ready to run: validating and loading it (`loader`),
//! building its command line (`cmdline`), laying out the boot-time guest
//! memory (`layout`) and the first vCPU state (`cpu`).

pub mod cmdline;
pub mod cpu;
pub mod layout;
pub mod loader;
