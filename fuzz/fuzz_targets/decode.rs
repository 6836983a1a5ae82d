//! Decoder fuzz target: arbitrary bytes, every protocol mode. The decoder must
//! never panic; whatever it accepts must re-encode (with `encoded_len` exact)
//! and decode back to an equal packet.

#![no_main]

use libfuzzer_sys::fuzz_target;
use millet_codec::bytes::BytesMut;
use millet_codec::{decode, encode, encoded_len, Packet, Protocol};

const MODES: [Option<Protocol>; 4] = [
    None,
    Some(Protocol::V3_1),
    Some(Protocol::V3_1_1),
    Some(Protocol::V5),
];

fuzz_target!(|data: &[u8]| {
    for mode in MODES {
        // Unlimited, and a small limit derived from the input to exercise
        // the early PacketTooLarge path.
        let small = data.first().map_or(0, |&b| usize::from(b) * 4);
        for max in [usize::MAX, small] {
            decode_all(data, mode, max);
        }
    }
});

fn decode_all(data: &[u8], mode: Option<Protocol>, max: usize) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decode(&mut buf, mode, max) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before, "a decoded packet consumes bytes");
                assert!(before - buf.len() <= max, "packet larger than max");
                round_trip(&packet, mode);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet consumes nothing");
                break;
            }
            Err(e) => {
                let _ = e.reason_code();
                break;
            }
        }
    }
}

fn round_trip(packet: &Packet, mode: Option<Protocol>) {
    // The wire format it was decoded in: CONNECT names its own version,
    // anything else before CONNECT is 3.1.1.
    let proto = match packet {
        Packet::Connect(c) => c.protocol,
        _ => mode.unwrap_or(Protocol::V3_1_1),
    };
    let mut wire = BytesMut::new();
    if let Err(e) = encode(packet, proto, &mut wire) {
        panic!("re-encoding {packet:?} for {proto:?} failed: {e}");
    }
    assert_eq!(encoded_len(packet, proto), Ok(wire.len()), "encoded_len");
    let copy = wire.clone();
    let again = match decode(&mut wire, mode, usize::MAX) {
        Ok(Some(p)) => p,
        other => panic!("re-decoding {packet:?} ({copy:?}) gave {other:?}"),
    };
    assert!(wire.is_empty(), "re-encoded packet fully consumed");
    // No normalization is expected: the decoder only accepts what the encoder
    // writes back identically (3.x CONNACK / SUBACK codes are canonical).
    assert_eq!(&again, packet, "round trip of {copy:?}");
    // Byte-stable from here on.
    let mut wire2 = BytesMut::new();
    if encode(&again, proto, &mut wire2).is_err() {
        panic!("second encode failed");
    }
    assert_eq!(wire2, copy, "encoding is deterministic");
}
