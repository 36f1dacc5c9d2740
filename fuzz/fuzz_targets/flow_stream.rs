//! What `netwatch observe` reads from an agent (a status line, then flow log
//! lines, `end_of_history`, `lost_records`), from arbitrary bytes: reading
//! never panics, and every flow record read re-encodes as a flow log line
//! that reads back to the same line.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use netwatch::{
    cli::observe::{ObserveItem, ObserveStream},
    export::flowlog::encode_line,
    flow::record::FlowLogLine,
};

fuzz_target!(|bytes: &[u8]| {
    let reader = Box::new(Cursor::new(bytes.to_vec()));
    let Ok(mut stream) = ObserveStream::from_reader(reader, "fuzz") else {
        return;
    };
    for _ in 0..64 {
        match stream.next_item() {
            Ok(Some(ObserveItem::Flow(record, _))) => {
                let line = encode_line(&record);
                let back: FlowLogLine = serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&line)));
                assert_eq!(
                    encode_line(&back.flow),
                    line,
                    "a record re-encodes to the same line"
                );
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
});
