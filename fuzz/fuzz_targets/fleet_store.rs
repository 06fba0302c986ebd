#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_shim_fuzz::fleet_store::run(data));
