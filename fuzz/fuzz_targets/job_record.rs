//! Job records as peers send them and the store holds them: any bytes
//! decode and validate or are refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_core::records::{Completion, JobRecord};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<JobRecord>(data) {
        let _ = r.validate();
        let _ = r.version.hlc.packed();
        let _ = r.version.hlc.ahead_of(u64::MAX / 2, 500);
    }
    let _ = serde_json::from_slice::<Completion>(data);
});
