//! The frame classifier and the whole pipeline on arbitrary bytes.
//!
//! The first byte picks the ingress (uplink or VM port); the rest is the
//! frame. It is classified, then run through a pipeline whose table holds
//! flows for it (so hit actions — decap, TTL, MAC rewrite, encap — run on
//! hostile frames too). Nothing may panic; every frame must be accounted
//! for exactly once.
#![no_main]

use std::net::Ipv4Addr;

use fastpath::{BatchOut, Desc, Kind, Pipeline, PipelineConfig, SliceMem};
use flowtable::{Action, EncapTemplate, FlowHasher, FlowKey, FlowTable, Ingress, PortId};
use libfuzzer_sys::fuzz_target;

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
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
        let tpl = vxlan::Template::new(&vxlan::TemplateSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            local_vtep: LOCAL,
            remote_vtep: Ipv4Addr::new(192, 168, 0, 2),
            vni: 1,
            ttl: 64,
        })
        .unwrap();
        let action = Action {
            decap: (sel & 2 != 0).then_some(c.outer_src),
            dec_ttl: sel & 4 != 0,
            set_eth_dst: Some([2, 0, 0, 0, 0, 3]),
            set_eth_src: Some([2, 0, 0, 0, 0, 4]),
            encap: (sel & 8 != 0).then(|| EncapTemplate(*tpl.bytes())),
            max_len: if sel & 16 != 0 { 100 } else { u16::MAX },
            ..Action::output(PortId(u16::from(sel >> 6)))
        };
        p.table_mut().insert(key, &action, 0).unwrap();
        assert!(matches!(key.ingress(), Some(Ingress::Port(_) | Ingress::Vni(_))));
    }
    let headroom = usize::from(sel >> 5) * 24;
    let mut mem = vec![0u8; 4096];
    let len = frame.len().min(4096 - headroom);
    mem[headroom..headroom + len].copy_from_slice(&frame[..len]);
    let descs = [Desc { addr: headroom as u64, len: len as u32 }];
    let mut out = BatchOut::new(3);
    p.process(port, &mut SliceMem::new(&mut mem, 4096).unwrap(), &descs, 1, &mut out);
    assert_eq!(out.tx.len() + out.punt.len() + out.dropped.len(), 1);
});
