//! The loop's handling of what comes back from the coprocessor, on ports
//! in memory: no kernel, no root.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::mpsc;

use dpif::{Invalidate, PuntMsg};
use flowtable::{Action, FlowKey, FlowTable};

use super::*;
use crate::punt::{punt_path, PuntConfig, PuntReason};
use crate::synth::{self, UdpFlow};
use crate::PipelineConfig;

/// A thread with two VM ports in memory (0 and 1), and its other ends.
struct Rig {
    dp: Dataplane,
    punts: PuntReceiver,
    installs: Arc<ArrayQueue<Update>>,
    reports: Arc<crate::report::Reports>,
    requests: Sender<Request>,
}

fn rig() -> Rig {
    let ports = (0..2u16)
        .map(|i| Port {
            id: PortId(i),
            name: format!("mem{i}"),
            io: PortIo::Memory(Box::default()),
            counters: PortCounters::default(),
        })
        .collect();
    let pipeline = Pipeline::new(
        &PipelineConfig {
            uplink: PortId(u16::MAX),
            local_vtep: Ipv4Addr::new(192, 168, 0, 1),
            udp_port: vxlan::UDP_PORT,
            ports: 2,
        },
        FlowTable::new(1024).unwrap(),
    );
    let (punter, punts) = punt_path(&PuntConfig::default(), 2);
    let installs = Arc::new(ArrayQueue::new(64));
    let reports = Arc::new(crate::report::Reports::new(1, 64));
    let (requests, rx) = mpsc::channel();
    let links = Links {
        punter,
        recycler: punts.clone(),
        installs: installs.clone(),
        requests: rx,
        wake: Arc::new(Wake::new().unwrap()),
        coprocessors: Vec::new(),
        reports: reports.clone(),
        epoch: Instant::now(),
        thread: 0,
    };
    let pool = FramePool::new(256, 2048, false).unwrap();
    Rig {
        dp: Dataplane::new(ports, pipeline, links, LoopConfig::default(), pool),
        punts,
        installs,
        reports,
        requests,
    }
}

fn frame(sport: u16) -> Vec<u8> {
    synth::udp_frame(
        &UdpFlow {
            src_mac: [2, 0, 0, 0, 0, 0x0a],
            dst_mac: [2, 0, 0, 0, 0, 0x0b],
            src_ip: Ipv4Addr::new(10, 0, 0, 10),
            dst_ip: Ipv4Addr::new(10, 0, 0, 11),
            src_port: sport,
            dst_port: 80,
        },
        80,
    )
}

impl Rig {
    fn receive(&mut self, port: usize, f: Vec<u8>) {
        match &mut self.dp.ports[port].io {
            PortIo::Memory(m) => m.queued.push_back(f),
            other => panic!("{other:?}"),
        }
        self.dp.poll_once();
    }

    fn sent(&mut self, port: usize) -> Vec<Vec<u8>> {
        match &mut self.dp.ports[port].io {
            PortIo::Memory(m) => std::mem::take(&mut m.sent),
            other => panic!("{other:?}"),
        }
    }

    fn apply(&mut self, u: Update) {
        self.installs.push(u).unwrap();
        self.dp.poll_once();
    }

    fn stats(&mut self) -> Snapshot {
        let (tx, rx) = mpsc::channel();
        self.requests.send(Request::Stats(tx)).unwrap();
        self.dp.poll_once();
        rx.try_recv().unwrap()
    }

    /// A frame from port 0 misses and is punted: the message.
    fn punted(&mut self, f: Vec<u8>) -> PuntMsg {
        self.receive(0, f);
        let m = self.punts.recv().expect("punted");
        assert_eq!(m.reason, PuntReason::Miss);
        m
    }
}

/// The coprocessor's answer to `msg`: its flow out of port 1, the frame
/// back to run again.
fn answer(msg: PuntMsg, version: u64) -> Update {
    Update {
        flows: vec![(msg.key.unwrap(), Action::output(PortId(1)))],
        reinject: true,
        frame: Some(msg),
        version,
        ..Update::default()
    }
}

#[test]
fn a_miss_is_punted_installed_and_its_frame_run_again_through_the_new_flow() {
    let mut r = rig();
    let f = frame(4000);
    let msg = r.punted(f.clone());
    assert!(r.sent(1).is_empty(), "nothing leaves before the flow is in");
    r.apply(answer(msg, 0));
    assert_eq!(r.sent(1), vec![f.clone()], "the punted frame, reinjected");
    // The next frame of the flow hits: no punt.
    r.receive(0, f.clone());
    assert_eq!(r.sent(1), vec![f]);
    assert!(r.punts.recv().is_none());
    let s = r.stats();
    assert_eq!((s.installs, s.reinjected, s.stale_installs), (1, 1, 0));
    assert_eq!(s.first_packet.count, 1);
    assert_eq!(s.ports[1].2.tx_packets, 2);
}

#[test]
fn an_update_decided_before_an_invalidation_is_not_installed_and_its_frame_is_decided_again() {
    let mut r = rig();
    let msg = r.punted(frame(4001));
    // A change (state version 5) lands before the answer decided under 4.
    r.apply(Update {
        invalidate: Some(Invalidate {
            acl: true,
            ..Invalidate::default()
        }),
        version: 5,
        ..Update::default()
    });
    r.apply(answer(msg, 4));
    assert!(r.sent(1).is_empty(), "a stale flow sends nothing");
    let again = r.punts.recv().expect("the frame is punted again");
    let s = r.stats();
    assert_eq!((s.installs, s.stale_installs, s.table_len), (0, 1, 0));
    // Decided again under the new version: installed.
    r.apply(answer(again, 5));
    assert_eq!(r.sent(1).len(), 1);
    assert_eq!(r.stats().installs, 1);
}

#[test]
fn a_paused_thread_installs_flows_but_holds_frames_until_it_resumes() {
    let mut r = rig();
    let msg = r.punted(frame(4002));
    let (tx, rx) = mpsc::channel();
    r.requests.send(Request::Pause(tx)).unwrap();
    r.dp.poll_once();
    let paused = rx.try_recv().unwrap();
    assert_eq!(paused.counters.len(), 2);
    let arp = vec![0xab; 60];
    let mut u = answer(msg, 0);
    u.tx.push((PortId(0), arp.clone()));
    r.apply(u);
    assert!(
        r.sent(1).is_empty() && r.sent(0).is_empty(),
        "paused: no frame goes"
    );
    assert_eq!(r.stats().table_len, 1, "the flow is in");
    // Paused, a port's frames are not read.
    r.receive(0, frame(4002));
    assert!(r.sent(1).is_empty());
    r.requests.send(Request::Resume(None)).unwrap();
    r.dp.poll_once();
    assert_eq!(r.sent(0), vec![arp]);
    assert_eq!(r.sent(1).len(), 1, "the reinjected frame");
    r.dp.poll_once();
    assert_eq!(r.sent(1).len(), 1, "the frame that waited on the port");
}

#[test]
fn checks_are_answered_with_each_flow_s_use_and_invalidations_remove_what_they_hit() {
    let mut r = rig();
    let msg = r.punted(frame(4003));
    let key = msg.key.unwrap();
    r.apply(answer(msg, 0));
    r.receive(0, frame(4003));
    let other = FlowKey { src_port: 9, ..key };
    r.apply(Update {
        checks: vec![CtCheck {
            id: 7,
            keys: [Some(key), Some(other)],
        }],
        ..Update::default()
    });
    match r.reports.pop(0) {
        Some(Report::Checked { id: 7, used, .. }) => {
            assert_eq!(used[0].map(|u| u.packets), Some(2));
            assert_eq!(used[1], None);
        }
        other => panic!("{other:?}"),
    }
    r.apply(Update {
        invalidate: Some(Invalidate {
            outputs: HashSet::from([PortId(1)]),
            ..Invalidate::default()
        }),
        version: 1,
        ..Update::default()
    });
    let s = r.stats();
    assert_eq!((s.table_len, s.invalidated), (0, 1));
    r.receive(0, frame(4003));
    assert!(r.punts.recv().is_some(), "gone: the next frame misses");
}

#[test]
fn a_port_s_first_unsupported_frames_are_logged_once() {
    let mut r = rig();
    // Asked here, not by the loop's once-a-second look.
    r.dp.next_announce = u64::MAX;
    assert_eq!(r.dp.announce_unsupported(), 0);
    let mut v6 = frame(4005);
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    r.receive(1, v6.clone());
    assert_eq!(r.dp.announce_unsupported(), 1, "port 1's IPv6, once");
    r.receive(1, v6.clone());
    r.receive(0, frame(4005));
    assert_eq!(
        r.dp.announce_unsupported(),
        0,
        "no second line, IPv4 is no news"
    );
    r.receive(0, v6);
    assert_eq!(r.dp.announce_unsupported(), 1, "port 0's own first");
    assert!(
        r.punts.recv().is_some(),
        "the IPv4 frame was punted as usual"
    );
}

#[test]
fn top_talkers_read_the_vni_and_vtep_from_each_flow_s_template() {
    let mut r = rig();
    let msg = r.punted(frame(4004));
    let key = msg.key.unwrap();
    let encap = crate::synth::fuzz_action(8, 0, 0);
    r.apply(Update {
        flows: vec![(key, encap)],
        ..Update::default()
    });
    let (tx, rx) = mpsc::channel();
    r.requests.send(Request::Talkers(tx)).unwrap();
    r.dp.poll_once();
    let t = rx.try_recv().unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].vni, 1);
    assert_eq!(Ipv4Addr::from(t[0].vtep), Ipv4Addr::new(192, 168, 0, 2));
    assert_eq!(Ipv4Addr::from(t[0].dst), Ipv4Addr::new(10, 0, 0, 11));
}

mod offloads;
