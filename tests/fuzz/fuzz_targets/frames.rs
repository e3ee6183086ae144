//! Everything the relay and the SDK parse off the wire: WebSocket frames both
//! ways and the HTTP bodies. None may panic, and a decoded client frame must
//! re-encode to something that decodes to the same frame.
#![no_main]

use khub::protocol::{
    ClientFrame, OpenSlot, PairMessage, PairMessages, ServerFrame, SyncRequest, SyncResponse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = ClientFrame::decode(text, 64 * 1024) {
        let again =
            ClientFrame::decode(&frame.to_text(), usize::MAX).expect("re-encoded frame decodes");
        assert_eq!(again.to_text(), frame.to_text());
    }
    let _ = serde_json::from_str::<ServerFrame>(text);
    let _ = serde_json::from_str::<SyncRequest>(text);
    let _ = serde_json::from_str::<SyncResponse>(text);
    let _ = serde_json::from_str::<OpenSlot>(text);
    let _ = serde_json::from_str::<PairMessage>(text);
    let _ = serde_json::from_str::<PairMessages>(text);
});
