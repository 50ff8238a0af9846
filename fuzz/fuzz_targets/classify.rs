//! The frame classifier and the whole pipeline on arbitrary bytes.
//!
//! The first byte picks the ingress (uplink or VM port) and the action's
//! rewrites, the second its connection tracking and NAT; the rest is the
//! frame. It is classified, then run through a pipeline whose table holds
//! flows for it (so hit actions — decap, connection events, TTL, NAT, MAC
//! rewrite, encap — run on hostile frames too). Nothing may panic; every frame must be accounted
//! for exactly once.
#![no_main]

use std::net::Ipv4Addr;

use fastpath::{BatchOut, Desc, Kind, Pipeline, PipelineConfig, SliceMem};
use flowtable::{FlowHasher, FlowKey, FlowTable, Ingress, PortId};
use libfuzzer_sys::fuzz_target;

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((&sel2, frame)) = rest.split_first() else {
        return;
    };
    let cfg = PipelineConfig {
        uplink: PortId(0),
        local_vtep: LOCAL,
        udp_port: 4789,
        ports: 3,
    };
    let port = PortId(u16::from(sel & 1));
    let mut p = Pipeline::new(&cfg, FlowTable::with_hasher(16, FlowHasher::with_seed(1)).unwrap());
    let mut key = FlowKey::default();
    let c = p.classifier().classify(port, frame, &mut key);
    if c.kind == Kind::Flow {
        assert!(usize::from(c.inner_start) + c.inner_len as usize <= frame.len());
        let action = fastpath::synth::fuzz_action(sel, sel2, c.outer_src);
        p.table_mut().insert(key, &action, 0).unwrap();
        assert!(matches!(key.ingress(), Some(Ingress::Port(_) | Ingress::Vni(_))));
    }
    let headroom = usize::from(sel >> 5) * 24;
    let mut mem = vec![0u8; 4096];
    let len = frame.len().min(4096 - headroom);
    mem[headroom..headroom + len].copy_from_slice(&frame[..len]);
    let descs = [Desc::new(headroom as u64, len as u32)];
    let mut out = BatchOut::new(3);
    p.set_reinjecting(sel2 & 2 != 0);
    p.process(port, &mut SliceMem::new(&mut mem, 4096).unwrap(), &descs, 1, &mut out);
    assert_eq!(out.tx.len() + out.punt.len() + out.dropped.len(), 1);
});
