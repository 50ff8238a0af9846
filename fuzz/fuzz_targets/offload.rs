//! Offload metadata and the segmenter on arbitrary bytes: the first 12
//! bytes are a virtio-net header as a tap or guest would give it, the
//! rest the frame (`fastpath::offload::exercise`: whatever
//! `offload::check` lets through is cut into segments, or has its
//! checksum completed, with no panic and no access outside the frame;
//! GRO's parser sees the frame and each segment).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fastpath::offload::exercise(data);
});
