//! Job files as users submit them: any text parses into a valid spec or an
//! error naming the field, never a panic; a parsed spec validates again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_core::job::JobSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = JobSpec::parse(text) {
        spec.validate(text).expect("a parsed spec is valid");
        let json = serde_json::to_string(&spec).expect("encodes");
        let back: JobSpec = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, spec);
    }
});
