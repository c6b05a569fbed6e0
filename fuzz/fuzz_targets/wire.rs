//! Node-to-node calls of the scheduler: any bytes decode to a request or
//! response or an error, never a panic; what decodes re-encodes, and every
//! record it carries validates or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_core::wire::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        let _ = Request::decode(&req.encode()).expect("a decoded request re-decodes");
        match req {
            Request::PutJobs(records) => {
                for r in records {
                    let _ = r.validate();
                }
            }
            Request::Start { job, .. } => {
                let _ = job.validate();
            }
            _ => {}
        }
    }
    if let Ok(resp) = Response::decode(data) {
        let _ = Response::decode(&resp.encode()).expect("a decoded response re-decodes");
        if let Response::SyncedJobs { newer, .. } = resp {
            for r in newer {
                let _ = r.validate();
            }
        }
    }
});
