use serde_reflection::{Registry, Samples, Tracer, TracerConfig};

use crate::SwitchState;

/// Every type a format-1 snapshot holds, as serde (and so bincode) sees it.
fn trace() -> Registry {
    let mut tracer = Tracer::new(TracerConfig::default().record_samples_for_newtype_structs(true));
    // A real state first: types that check their bytes as they are read
    // (an encapsulation template) are then read from its values.
    let mut samples = Samples::new();
    tracer
        .trace_value(&mut samples, &crate::tests::state())
        .expect("tracing a state");
    tracer
        .trace_type::<SwitchState>(&samples)
        .expect("tracing SwitchState");
    // Each enum reached from it, every variant (a new enum type makes
    // `registry` fail naming it: add it here).
    macro_rules! every_variant {
        ($($t:ty),* $(,)?) => {$(
            tracer.trace_type::<$t>(&samples).expect(stringify!($t));
        )*};
    }
    use coprocessor::{acl, conntrack, topology};
    every_variant!(
        flowtable::Action,
        flowtable::Output,
        flowtable::NatSide,
        acl::Direction,
        acl::Peer,
        topology::Via,
        conntrack::TcpState,
        conntrack::ConnState,
        acl::RuleRef,
        conntrack::Conn,
        conntrack::Admission,
        topology::LocalVm,
        topology::Network,
        topology::RemoteVm,
    );
    tracer.registry().expect("a complete registry")
}

#[test]
fn the_live_types_still_write_format_1() {
    let registry = trace();
    let actual = serde_json::to_string_pretty(&registry).expect("registry as JSON") + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/format/v1.json");
    let frozen = std::fs::read_to_string(path).unwrap_or_default();
    if actual != frozen {
        let out = std::env::temp_dir().join("vswitch-format-v1.actual.json");
        let _ = std::fs::write(&out, &actual);
        panic!(
            "the live types no longer write snapshot format 1 as frozen in {path} \
             (what they write now: {}): make format 2 a deliberate step, see \
             live-migrate/src/format.rs",
            out.display()
        );
    }
}
