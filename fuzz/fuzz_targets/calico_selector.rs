//! Calico selectors from arbitrary text: parsing never panics, errors point
//! inside the text (or one past its end), and what parses prints as a
//! canonical text that parses back to the same expression.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netwatch::policy::Labels;
use netwatch::policy::api::calico::CalicoSelector;

fuzz_target!(|text: &str| {
    match CalicoSelector::parse(text) {
        Ok(selector) => {
            let canonical = selector.expr().to_string();
            let again = CalicoSelector::parse(&canonical)
                .unwrap_or_else(|e| panic!("canonical text of {text:?} does not parse: {e}"));
            assert_eq!(again.expr(), selector.expr(), "{text:?} -> {canonical:?}");
            let _ = selector.matches(&Labels::new());
        }
        Err(error) => {
            let columns = text.chars().count() + 1;
            assert!(
                (1..=columns).contains(&error.column),
                "{text:?}: column {} outside 1..={columns}",
                error.column
            );
        }
    }
});
