//! Manifests from arbitrary text (YAML, and JSON by file name): loading
//! never panics, and what loads builds a policy engine or is refused with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netwatch::{
    manifests,
    policy::{EngineOptions, PolicyEngine},
};

fuzz_target!(|input: (bool, &str)| {
    let (json, text) = input;
    let name = if json { "fuzz.json" } else { "fuzz.yaml" };
    if let Ok(snapshot) = manifests::load_str(name, text) {
        let _ = PolicyEngine::new(&snapshot, EngineOptions::default());
    }
});
