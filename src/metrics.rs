//! Prometheus text exposition of the switch's counters: per port, drops
//! by reason and port (and policy drops by VM and the default-deny rule),
//! punts, the flow table, the coprocessors (decisions, drops by cause,
//! backlog, first-packet latency), connection tracking and NAT.

use std::fmt::Write;

use coprocessor::Shared;
use fastpath::dataplane::Snapshot;
use fastpath::{DropReason, PuntReason};

/// A metrics page being written: each family's HELP and TYPE once.
#[derive(Default)]
pub struct Metrics {
    out: String,
    seen: std::collections::HashSet<&'static str>,
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        if self.seen.insert(name) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
    }

    /// One sample; `labels` as (name, value).
    pub fn sample(
        &mut self,
        name: &'static str,
        kind: &str,
        help: &str,
        labels: &[(&str, &str)],
        v: f64,
    ) {
        self.family(name, kind, help);
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
        }
    }

    /// A histogram: cumulative counts under each upper bound `le`
    /// (seconds), then the sum and the count (`+Inf`).
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        buckets: impl Iterator<Item = (f64, u64)>,
        sum: f64,
        count: u64,
    ) {
        self.family(name, "histogram", help);
        let mut seen = 0;
        for (le, n) in buckets {
            seen += n;
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {seen}");
        }
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.out, "{name}_sum {sum}\n{name}_count {count}");
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// `vswitch_thread_busy_ratio`, written for the fast path and for each
/// coprocessor.
const BUSY_HELP: &str =
    "Share of the last second a thread spent working (not polling idle or asleep).";

#[allow(clippy::cast_precision_loss)]
fn f(v: u64) -> f64 {
    v as f64
}

/// The fast path's counters.
pub fn fast_path(m: &mut Metrics, s: &Snapshot) {
    for (id, name, c) in &s.ports {
        let l = [("port", name.as_str())];
        for (metric, help, v) in [
            (
                "vswitch_port_rx_packets_total",
                "Frames received on the port.",
                c.rx_packets,
            ),
            (
                "vswitch_port_rx_bytes_total",
                "Bytes received on the port.",
                c.rx_bytes,
            ),
            (
                "vswitch_port_tx_packets_total",
                "Frames sent on the port.",
                c.tx_packets,
            ),
            (
                "vswitch_port_tx_bytes_total",
                "Bytes sent on the port.",
                c.tx_bytes,
            ),
            (
                "vswitch_port_rx_errors_total",
                "Receive errors.",
                c.rx_errors,
            ),
            (
                "vswitch_port_tx_errors_total",
                "Transmit errors.",
                c.tx_errors,
            ),
            (
                "vswitch_port_tx_dropped_total",
                "Frames the port could not take.",
                c.tx_dropped,
            ),
            (
                "vswitch_port_rx_no_buffer_total",
                "Receives skipped for want of a frame buffer.",
                c.rx_no_buffer,
            ),
            (
                "vswitch_port_tx_segments_total",
                "Segments cut in software from super-frames sent on the port (no TSO there).",
                c.tx_segments,
            ),
            (
                "vswitch_port_tx_coalesced_total",
                "Segments merged into super-frames (GRO) on their way to the port.",
                c.tx_coalesced,
            ),
            (
                "vswitch_port_tx_csum_completed_total",
                "Partial checksums completed in software for the port.",
                c.tx_csum_completed,
            ),
            (
                "vswitch_port_tx_offload_dropped_total",
                "Frames or segments lost on the way out: no free chunk, or offload metadata that did not hold.",
                c.tx_offload_dropped,
            ),
        ] {
            m.sample(metric, "counter", help, &l, f(v));
        }
        if let Some(d) = s.pipeline.port_drops.get(usize::from(id.0)) {
            for r in DropReason::ALL {
                let v = d.0[r.index()];
                if v > 0 {
                    m.sample(
                        "vswitch_drops_total",
                        "counter",
                        "Frames the fast path dropped, by ingress port and reason.",
                        &[("port", name), ("reason", r.name())],
                        f(v),
                    );
                }
            }
        }
    }
    for r in PuntReason::ALL {
        m.sample(
            "vswitch_punts_total",
            "counter",
            "Frames sent to the coprocessor, by reason.",
            &[("reason", r.name())],
            f(s.punted[r.index()]),
        );
    }
    let p = &s.pipeline;
    m.sample(
        "vswitch_pipeline_hits_total",
        "counter",
        "Flow table hits.",
        &[],
        f(p.hits),
    );
    m.sample(
        "vswitch_pipeline_misses_total",
        "counter",
        "Flow table misses.",
        &[],
        f(p.misses),
    );
    m.sample(
        "vswitch_flows",
        "gauge",
        "Flows in the table.",
        &[],
        f(s.table_len as u64),
    );
    m.sample(
        "vswitch_flow_capacity",
        "gauge",
        "Flow table capacity.",
        &[],
        f(s.table_capacity as u64),
    );
    m.sample(
        "vswitch_flows_expired_total",
        "counter",
        "Flows removed idle.",
        &[],
        f(s.table.expired),
    );
    m.sample(
        "vswitch_flows_invalidated_total",
        "counter",
        "Flows removed by changes of topology or policy.",
        &[],
        f(s.invalidated),
    );
    m.sample(
        "vswitch_flow_install_failures_total",
        "counter",
        "Flows the table refused (full).",
        &[],
        f(s.install_failures),
    );
    m.sample(
        "vswitch_frame_pool_free",
        "gauge",
        "Free frame buffers.",
        &[],
        f(s.pool_free as u64),
    );
    let fp = &s.first_packet;
    let bounded = fastpath::dataplane::FirstPacket::BUCKETS - 1;
    m.histogram(
        "vswitch_first_packet_seconds",
        "Punt-to-transmit time of first packets through the coprocessor.",
        fp.buckets[..bounded]
            .iter()
            .enumerate()
            .map(|(i, &n)| (f(fastpath::dataplane::FirstPacket::bound_ns(i)) / 1e9, n)),
        fp.sum_ns as f64 / 1e9,
        fp.count,
    );
    m.sample(
        "vswitch_uptime_seconds",
        "gauge",
        "Time since the fast path started.",
        &[],
        s.uptime_ns as f64 / 1e9,
    );
}

/// Each coprocessor thread's busy share.
/// Per service: live connections, backends taking new ones, picks,
/// refusals by cause, resets.
fn services(m: &mut Metrics, sh: &Shared) {
    let svcs = sh.services();
    for svc in svcs.iter() {
        let name = svc.spec.name.as_str();
        let l = [("service", name)];
        m.sample(
            "vswitch_service_connections",
            "gauge",
            "Live connections through the service's VIP.",
            &l,
            f(u64::from(svcs.service_conns(&svc.spec))),
        );
        let taking = svc
            .spec
            .backends
            .iter()
            .zip(&svc.down)
            .filter(|(b, down)| b.weight > 0 && !**down)
            .count();
        m.sample(
            "vswitch_service_backends_taking",
            "gauge",
            "Backends taking new connections (not drained, not down).",
            &l,
            taking as f64,
        );
        let c = svc.counters;
        m.sample(
            "vswitch_service_picked_total",
            "counter",
            "Connections given a backend.",
            &l,
            f(c.picked),
        );
        for (cause, v) in [
            ("limit", c.refused_limit),
            ("no_backend", c.refused_no_backend),
        ] {
            m.sample(
                "vswitch_service_refused_total",
                "counter",
                "New connections the service refused, by cause.",
                &[("service", name), ("cause", cause)],
                f(v),
            );
        }
        m.sample(
            "vswitch_service_resets_total",
            "counter",
            "Segments of no connection answered with a reset from the VIP.",
            &l,
            f(c.resets),
        );
        for (b, down) in svc.spec.backends.iter().zip(&svc.down) {
            let backend = format!("{}:{}", b.ip, b.port);
            let bl = [("service", name), ("backend", backend.as_str())];
            m.sample(
                "vswitch_service_backend_taking",
                "gauge",
                "1 if the backend takes new connections (weight above 0, not down), else 0.",
                &bl,
                if b.weight > 0 && !*down { 1.0 } else { 0.0 },
            );
            let p = svcs.passive_counts(svc.spec.vni, b.ip, b.port);
            for (what, v) in [("refused", p.refused), ("timed_out", p.timed_out)] {
                m.sample(
                    "vswitch_service_backend_failed_total",
                    "counter",
                    "New connections a backend refused or let time out (passive checks).",
                    &[
                        ("service", name),
                        ("backend", backend.as_str()),
                        ("how", what),
                    ],
                    f(v),
                );
            }
        }
    }
}

/// Each fast-path thread's busy share, packets received and flows.
pub fn fast_path_threads(m: &mut Metrics, each: &[Snapshot]) {
    type Of = fn(&Snapshot) -> f64;
    let metrics: [(&'static str, &str, &str, Of); 3] = [
        ("vswitch_thread_busy_ratio", "gauge", BUSY_HELP, |s| {
            f64::from(s.busy_permille) / 1000.0
        }),
        (
            "vswitch_fastpath_thread_rx_packets_total",
            "counter",
            "Frames a fast-path thread received (from its queue of every port).",
            |s| s.pipeline.rx_packets as f64,
        ),
        (
            "vswitch_fastpath_thread_flows",
            "gauge",
            "Flows in a fast-path thread's table.",
            |s| s.table_len as f64,
        ),
    ];
    for (name, kind, help, of) in metrics {
        for s in each {
            let thread = format!("fastpath-{}", s.thread);
            m.sample(name, kind, help, &[("thread", &thread)], of(s));
        }
    }
}

pub fn coprocessor_loads(m: &mut Metrics, loads: &[crate::cores::Load]) {
    for (i, l) in loads.iter().enumerate() {
        let name = format!("coproc-{i}");
        m.sample(
            "vswitch_thread_busy_ratio",
            "gauge",
            BUSY_HELP,
            &[("thread", &name)],
            l.busy_pct() / 100.0,
        );
    }
}

/// The coprocessors' shared state.
pub fn coprocessor(m: &mut Metrics, sh: &Shared, backlog: usize) {
    m.sample(
        "vswitch_coprocessor_backlog",
        "gauge",
        "Punted frames waiting for a coprocessor.",
        &[],
        f(backlog as u64),
    );
    m.sample(
        "vswitch_coprocessor_decisions_total",
        "counter",
        "Punted frames decided.",
        &[],
        f(sh.counters().handled),
    );
    for (kind, v) in ["arp", "dhcp", "icmp"]
        .into_iter()
        .zip(sh.counters().replies())
    {
        m.sample(
            "vswitch_coprocessor_replies_total",
            "counter",
            "Frames the coprocessor answered itself (ARP proxy, DHCP server, ICMP from the gateways), by kind.",
            &[("kind", kind)],
            f(v),
        );
    }
    for (cause, v) in sh.counters().drops_by_cause() {
        if v > 0 {
            m.sample(
                "vswitch_coprocessor_drops_total",
                "counter",
                "Frames the coprocessor dropped or left unanswered, by cause.",
                &[("cause", cause)],
                f(v),
            );
        }
    }
    for (port, d) in coprocessor::shared::guard(&sh.vm_drops).iter() {
        let vm = sh
            .topo
            .vm_on(*port)
            .map_or_else(|| format!("port {}", port.0), |v| v.name.clone());
        m.sample(
            "vswitch_policy_drops_total",
            "counter",
            "New connections security groups refused, by VM and rule (allow-lists: the default deny).",
            &[("vm", &vm), ("rule", "default-deny")],
            f(d.acl_denied),
        );
        m.sample(
            "vswitch_conntrack_refused_total",
            "counter",
            "New connections refused for the VM's quota or a full table.",
            &[("vm", &vm)],
            f(d.ct_refused),
        );
        m.sample(
            "vswitch_nat_refused_total",
            "counter",
            "SNAT ports refused (quota or exhaustion).",
            &[("vm", &vm)],
            f(d.nat_refused),
        );
    }
    let c = sh.ct.counters();
    m.sample(
        "vswitch_conntrack_connections",
        "gauge",
        "Tracked connections.",
        &[],
        f(sh.ct.len() as u64),
    );
    m.sample(
        "vswitch_conntrack_created_total",
        "counter",
        "Connections created.",
        &[],
        f(c.created),
    );
    m.sample(
        "vswitch_conntrack_expired_total",
        "counter",
        "Connections ended by their timers.",
        &[],
        f(c.expired),
    );
    m.sample(
        "vswitch_conntrack_revoked_total",
        "counter",
        "Connections cut by changes of topology or policy.",
        &[],
        f(c.revoked),
    );
    m.sample(
        "vswitch_conntrack_related_total",
        "counter",
        "ICMP errors let through as related.",
        &[],
        f(c.related),
    );
    if let Some(n) = coprocessor::shared::guard(&sh.nat).as_ref() {
        m.sample(
            "vswitch_nat_ports_in_use",
            "gauge",
            "SNAT ports held.",
            &[],
            f(n.in_use()),
        );
    }
    services(m, sh);
    m.sample(
        "vswitch_state_version",
        "gauge",
        "Changes of topology or policy applied.",
        &[],
        f(sh.version),
    );
}
