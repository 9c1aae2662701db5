//! Feeds arbitrary bytes to `pgoutput::Decoder`.
//!
//! Input layout: the first byte configures the run — bits 0–1 the protocol version (1–4), bit 2
//! starts inside a streamed block, bit 3 splits the rest into a sequence of messages
//! (`[u16 big-endian length][bytes]...`, fed to one decoder so Stream Start/Stop change how later
//! messages parse) instead of one message.
//!
//! Checks, beyond "no panic, no out-of-bounds read" (ASan):
//! - a rejected message leaves the stream state unchanged;
//! - an accepted message re-encodes to exactly the input bytes (the decoder drops and invents
//!   nothing), and the encoder, fed the same messages, agrees on the stream state;
//! - every tuple yields exactly `len()` columns, each borrowed from the input.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgoutput::{Decoder, Encoder, Message, OldTuple, StreamStart, TupleData};

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let version = u32::from(config & 3) + 1;
    let mut decoder = Decoder::new(version);
    let mut encoder = Encoder::new(version);
    if config & 4 != 0 {
        let start = Message::StreamStart(StreamStart {
            xid: 1,
            first_segment: 1,
        });
        let bytes = encoder.encode(&start).expect("encode Stream Start");
        decoder.decode(bytes).expect("decode Stream Start");
    }
    if config & 8 == 0 {
        check(&mut decoder, &mut encoder, rest);
        return;
    }
    let mut rest = rest;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (message, next) = tail.split_at(n);
        check(&mut decoder, &mut encoder, message);
        rest = next;
    }
});

fn check(decoder: &mut Decoder, encoder: &mut Encoder, message: &[u8]) {
    let raw = Bytes::copy_from_slice(message);
    let before = decoder.in_stream();
    match decoder.decode(raw.clone()) {
        Ok(msg) => {
            for t in tuples(&msg) {
                let range = raw.as_ptr_range();
                let mut n = 0;
                for column in t {
                    n += 1;
                    if let Some(v) = column.bytes().filter(|v| !v.is_empty()) {
                        assert!(
                            range.contains(&v.as_ptr()),
                            "column not borrowed from input"
                        );
                        assert!(v.as_ptr_range().end <= range.end, "column past the input");
                    }
                }
                assert_eq!(n, t.len(), "tuple iterates a different column count");
            }
            let again = encoder
                .encode(&msg)
                .expect("an accepted message must re-encode");
            assert_eq!(again, raw, "re-encoding {msg:?} changed the bytes");
        }
        Err(e) => {
            assert_eq!(decoder.in_stream(), before, "failed decode changed state");
            // Displaying an error must not panic either.
            let _ = e.to_string();
        }
    }
    assert_eq!(decoder.in_stream(), encoder.in_stream());
}

fn old(o: &OldTuple) -> &TupleData {
    match o {
        OldTuple::Key(t) | OldTuple::Full(t) => t,
    }
}

fn tuples(msg: &Message) -> Vec<&TupleData> {
    match msg {
        Message::Insert(m) => vec![&m.tuple],
        Message::Update(m) => m.old.iter().map(old).chain([&m.new]).collect(),
        Message::Delete(m) => vec![old(&m.old)],
        _ => Vec::new(),
    }
}
