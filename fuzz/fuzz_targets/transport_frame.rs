//! Transport frames off the wire: garbage decodes to nothing, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shoal_transport::decode_frame(data);
});
