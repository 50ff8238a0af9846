//! Replays the checked-in fuzz corpora (`fuzz/corpus/`) through the
//! classifier, the pipeline and VXLAN decap on every test run, so the
//! inputs the fuzzers found interesting stay covered without nightly.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use fastpath::{BatchOut, Desc, Kind, Pipeline, PipelineConfig, SliceMem};
use flowtable::{FlowHasher, FlowKey, FlowTable, PortId};

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn classify_corpus_is_handled() {
    let inputs = corpus("classify");
    assert!(inputs.len() >= 8, "seed corpus incomplete");
    let cfg = PipelineConfig {
        uplink: PortId(0),
        local_vtep: Ipv4Addr::new(192, 168, 0, 1),
        udp_port: 4789,
        ports: 3,
    };
    let mut flows = 0;
    for data in inputs {
        // The target's format: two selector bytes, then the frame.
        let Some((&sel, rest)) = data.split_first() else {
            continue;
        };
        let Some((&sel2, frame)) = rest.split_first() else {
            continue;
        };
        let port = PortId(u16::from(sel & 1));
        let mut p = Pipeline::new(
            &cfg,
            FlowTable::with_hasher(16, FlowHasher::with_seed(1)).unwrap(),
        );
        let mut key = FlowKey::default();
        let c = p.classifier().classify(port, frame, &mut key);
        if c.kind == Kind::Flow {
            flows += 1;
            let action = fastpath::synth::fuzz_action(sel, sel2, c.outer_src);
            p.table_mut().insert(key, &action, 0).unwrap();
        }
        p.set_reinjecting(sel2 & 2 != 0);
        let mut mem = vec![0u8; 4096];
        let len = frame.len().min(4096 - 64);
        mem[64..64 + len].copy_from_slice(&frame[..len]);
        let mut out = BatchOut::new(3);
        let d = [Desc::new(64, u32::try_from(len).unwrap())];
        p.process(
            port,
            &mut SliceMem::new(&mut mem, 4096).unwrap(),
            &d,
            1,
            &mut out,
        );
        assert_eq!(out.tx.len() + out.punt.len() + out.dropped.len(), 1);
    }
    assert!(flows >= 5, "the seeds' valid frames must classify as flows");
}

#[test]
fn decap_corpus_is_handled() {
    let cfg = vxlan::DecapConfig {
        local_vtep: 0xc0a8_0001,
        udp_port: 4789,
    };
    let mut ok = 0;
    for data in corpus("vxlan_decap") {
        let fast = vxlan::decap(&data, &cfg);
        assert_eq!(
            fast.is_ok(),
            vxlan::decap::decap_checked(&data, &cfg).is_ok()
        );
        if let Ok(d) = fast {
            assert!(d.inner().end <= data.len());
            ok += 1;
        }
    }
    assert!(ok >= 2, "the valid seeds must decapsulate");
}

#[test]
fn offload_corpus_is_handled() {
    let inputs = corpus("offload");
    assert!(inputs.len() >= 12, "seed corpus incomplete");
    let taken = inputs
        .iter()
        .filter(|d| fastpath::offload::exercise(d))
        .count();
    // The seeds: six valid (TSO, TSO with ECN, USO, checksum only, data
    // valid, plain), one IPv6 passed on, five hostile.
    assert!(taken >= 7, "the valid seeds must be taken: {taken}");
    assert!(taken < inputs.len(), "the hostile seeds must be refused");
}
