use super::*;

fn spec(interval_ms: u32, timeout_ms: u32, rise: u8, fall: u8) -> HealthSpec {
    HealthSpec {
        tcp: true,
        interval_ms,
        timeout_ms,
        rise,
        fall,
    }
}

#[test]
fn every_bad_field_is_named() {
    assert!(spec(1000, 500, 2, 2).check().is_ok());
    for (bad, field) in [
        (spec(100, 50, 2, 2), "interval_ms"),
        (spec(1000, 2000, 2, 2), "timeout_ms"),
        (spec(1000, 5, 2, 2), "timeout_ms"),
        (spec(1000, 500, 0, 2), "rise"),
        (spec(1000, 500, 2, 11), "fall"),
    ] {
        let e = bad.check().unwrap_err();
        assert!(e.contains(&format!("field `health.{field}`")), "{e}");
    }
}
