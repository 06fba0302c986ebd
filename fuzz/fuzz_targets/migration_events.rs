#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_shim_fuzz::migration_events::run(data));
