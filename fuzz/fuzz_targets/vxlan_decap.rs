//! VXLAN decapsulation on arbitrary bytes: no panic, the inner range lies
//! inside the frame, and the fast path agrees with the field-by-field one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vxlan::{decap, DecapConfig};

fuzz_target!(|data: &[u8]| {
    let cfg = DecapConfig {
        local_vtep: 0xc0a8_0001,
        udp_port: 4789,
    };
    let fast = decap(data, &cfg);
    let slow = vxlan::decap::decap_checked(data, &cfg);
    assert_eq!(fast.is_ok(), slow.is_ok());
    if let Ok(d) = fast {
        assert_eq!(Ok(d), slow);
        assert!(d.inner().end <= data.len());
        assert!(d.vni <= 0x00ff_ffff);
    }
});
