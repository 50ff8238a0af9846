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

/// What format 2 adds after format 1's body.
fn trace_since2() -> Registry {
    let mut tracer = Tracer::new(TracerConfig::default().record_samples_for_newtype_structs(true));
    let samples = Samples::new();
    tracer
        .trace_type::<crate::Since2>(&samples)
        .expect("tracing Since2");
    tracer.registry().expect("a complete registry")
}

/// `registry` is the one frozen in `format/NAME.json`.
fn frozen(registry: &Registry, name: &str) {
    let actual = serde_json::to_string_pretty(registry).expect("registry as JSON") + "\n";
    let path = format!("{}/format/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let frozen = std::fs::read_to_string(&path).unwrap_or_default();
    if actual != frozen {
        let out = std::env::temp_dir().join(format!("vswitch-format-{name}.actual.json"));
        let _ = std::fs::write(&out, &actual);
        panic!(
            "the live types no longer write what {path} freezes \
             (what they write now: {}): make the next format a deliberate step, \
             see live-migrate/src/format.rs",
            out.display()
        );
    }
}

#[test]
fn the_live_types_still_write_format_1() {
    frozen(&trace(), "v1");
}

#[test]
fn the_live_types_still_write_what_format_2_adds() {
    frozen(&trace_since2(), "since2");
}
