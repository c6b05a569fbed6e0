//! Join tokens as users paste them: anything else is an error, not a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        // Both formats `--token` takes: a join token and an encoded CA.
        let _ = shoal_transport::tls::Admission::parse(text);
    }
});
