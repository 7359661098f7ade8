#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| caep_fuzz::poll_request(data));
