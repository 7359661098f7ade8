#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caep_fuzz::jose_verify(data));
