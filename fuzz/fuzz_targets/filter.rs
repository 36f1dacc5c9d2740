//! Flow filter expressions (`key=value ...` and the JSON form) from
//! arbitrary text: parsing never panics, what parses goes to its JSON wire
//! form and back to the same filter, and matching a record never panics.
#![no_main]

#[path = "../common/sample.rs"]
mod sample;

use libfuzzer_sys::fuzz_target;
use netwatch::export::filter::FlowFilter;

fuzz_target!(|text: &str| {
    let Ok(filter) = FlowFilter::parse_expr(text) else {
        return;
    };
    let wire = filter.to_json().to_string();
    let back = FlowFilter::from_json(&wire)
        .unwrap_or_else(|e| panic!("{text:?}: its JSON form {wire} does not parse: {e}"));
    assert_eq!(back, filter, "{text:?} -> {wire}");
    for r in sample::records() {
        assert_eq!(filter.matches(&r), back.matches(&r));
    }
});
