use super::*;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: M) {
    let back: M = decode(&encode(&m)).expect(M::NAME);
    assert_eq!(back, m);
    assert_eq!(back.protocol(), PROTOCOL);
}

fn offer() -> Offer {
    Offer {
        protocol: PROTOCOL,
        ports: vec![
            PortEntry::Tap {
                name: "tap-a".into(),
                fd: 1,
            },
            PortEntry::AfXdp {
                name: "veth-c".into(),
                fd: 2,
                ring_size: 2048,
                sg: false,
            },
            PortEntry::VhostUser {
                name: "vm-d".into(),
            },
            PortEntry::Closed {
                name: "gone".into(),
            },
        ],
        listener_fd: 3,
        pool: PoolEntry {
            fd: 4,
            len: 1 << 24,
            huge: true,
            chunk_size: 2048,
        },
        xdp_links: vec![5, 6],
        snapshot_fd: 0,
        snapshot: 12345,
        flows: FlowSection {
            offset: 16384,
            count: 10,
            crc: 0xdead_beef,
        },
        hash_seed: 42,
        held_mono_ns: Some(7),
        started_mono_ns: 8,
        packed_mono_ns: 9,
        confirm_ack: true,
        threads: Vec::new(),
        socket_maps: Vec::new(),
    }
}

fn pause() -> PauseHeader {
    PauseHeader {
        protocol: PROTOCOL,
        paused_mono_ns: 1,
        packed_mono_ns: 2,
        free: 3,
        counters: vec![BTreeMap::from([("rx_packets".to_string(), 5)])],
        pipeline: PipelineCounters {
            hits: 9,
            drops: BTreeMap::from([("ttl_exceeded".to_string(), 1)]),
            port_drops: vec![BTreeMap::new()],
            ..Default::default()
        },
        vhost: vec![VhostPort {
            name: "vm-d".into(),
            socket: "/run/vm-d.sock".into(),
            mode: VhostMode::Client,
            mac: [2, 0, 0, 0, 0, 0xd],
            listener: None,
            conn: Some(VhostConn {
                fd: 0,
                record: vec![VhostMessage {
                    request: 5,
                    flags: 1,
                    payload: vec![1, 2, 3],
                    fds: vec![1],
                }],
            }),
        }],
        threads: Vec::new(),
    }
}

#[test]
fn every_message_round_trips() {
    round_trip(PrepareRequest::default());
    round_trip(HandoverRequest::default());
    round_trip(PrepareAnswer {
        protocol: PROTOCOL,
        config: "[switch]\n".into(),
        epoch_mono_ns: 99,
    });
    round_trip(offer());
    round_trip(pause());
    let e = ErrorAnswer { error: "no".into() };
    let back: ErrorAnswer = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
    assert_eq!(back, e);
}

/// The headers exactly as the binaries before this module wrote them
/// (`json!` literals, no `protocol` field) read as protocol 1: the
/// upgrade from the previous release goes through this path.
#[test]
fn messages_without_a_version_are_the_first_protocol() {
    let old_offer = br#"{"ports":[{"name":"tap-a","kind":"tap","fd":1},{"name":"veth-c","kind":"af_xdp","fd":2,"ring_size":2048},{"name":"vm-d","kind":"vhost_user"},{"name":"gone","kind":"closed"}],"listener_fd":3,"pool":{"fd":4,"len":16777216,"huge":true,"chunk_size":2048},"xdp_links":[5,6],"snapshot_fd":0,"hash_seed":42,"snapshot":12345,"flows":{"offset":16384,"count":10,"crc":3735928559},"held_mono_ns":7,"confirm_ack":true,"started_mono_ns":8,"packed_mono_ns":9}"#;
    assert_eq!(decode::<Offer>(old_offer), Ok(offer()));
    let old_pause = br#"{"paused_mono_ns":1,"free":3,"counters":[{"rx_packets":5}],"pipeline":{"rx_packets":0,"rx_bytes":0,"hits":9,"misses":0,"tx_packets":0,"punts":{},"drops":{"ttl_exceeded":1},"port_drops":[{}]},"vhost":[{"name":"vm-d","socket":"/run/vm-d.sock","mode":"client","mac":[2,0,0,0,0,13],"listener":null,"conn":{"fd":0,"record":[{"request":5,"flags":1,"payload":[1,2,3],"fds":[1]}]}}],"packed_mono_ns":2}"#;
    assert_eq!(decode::<PauseHeader>(old_pause), Ok(pause()));
    let old_prepare = br#"{"config":"[switch]\n","epoch_mono_ns":99}"#;
    assert_eq!(
        decode::<PrepareAnswer>(old_prepare).unwrap().epoch_mono_ns,
        99
    );
    // A binary older still sent neither the hold time nor the ack flag.
    let mut v: serde_json::Value = serde_json::from_slice(old_offer).unwrap();
    v.as_object_mut().unwrap().remove("held_mono_ns");
    v.as_object_mut().unwrap().remove("confirm_ack");
    let o: Offer = decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!((o.held_mono_ns, o.confirm_ack), (None, false));
}

#[test]
fn a_switch_of_several_threads_offers_each_threads_queues_pool_and_flows() {
    let mut o = offer();
    o.threads.push(ThreadOffer {
        ports: vec![
            PortEntry::Tap {
                name: "tap-a".into(),
                fd: 7,
            },
            PortEntry::AfXdp {
                name: "veth-c".into(),
                fd: 8,
                ring_size: 2048,
                sg: false,
            },
        ],
        pool: PoolEntry {
            fd: 9,
            len: 1 << 24,
            huge: true,
            chunk_size: 2048,
        },
        hash_seed: 43,
        flows: 4,
    });
    round_trip(o.clone());
    assert_eq!(o.thread_flows(), Ok(vec![6, 4]));
    let seeds: Vec<u64> = o.thread_parts().map(|p| p.2).collect();
    assert_eq!(seeds, vec![42, 43]);
    assert_eq!(o.check_descriptors(10), Ok(()));
    o.socket_maps.push(SocketMapEntry {
        interface: "eth1".into(),
        fd: 10,
    });
    round_trip(o.clone());
    assert!(
        o.check_descriptors(10).is_err(),
        "the map's descriptor is checked"
    );
    assert_eq!(o.check_descriptors(11), Ok(()));
    // Thread 1's descriptors are checked too: missing, or one used twice.
    assert!(o.check_descriptors(9).is_err());
    let mut twice = o.clone();
    twice.threads[0].pool.fd = 4;
    assert!(twice.check_descriptors(10).is_err());
    let mut greedy = o.clone();
    greedy.threads[0].flows = 11;
    assert!(greedy.thread_flows().is_err());
    // A request from a binary of one thread reads as one thread.
    let r: HandoverRequest = decode(br#"{"protocol":1}"#).unwrap();
    assert_eq!(r.fastpath_threads, None);
    round_trip(HandoverRequest::for_threads(2));
    // The pause: thread 1's free list counts toward the bytes that follow.
    let mut p = pause();
    p.threads.push(ThreadPause {
        free: 5,
        counters: vec![BTreeMap::new()],
        pipeline: PipelineCounters::default(),
    });
    round_trip(p.clone());
    assert_eq!(p.free_bytes(), Ok(8 * 8));
    p.threads[0].free = MAX_FREE + 1;
    assert!(p.free_bytes().is_err());
}

#[test]
fn an_unknown_version_is_refused_before_its_body_is_read() {
    // A later protocol may have another shape: the version decides.
    let later = br#"{"protocol":2,"something":"else"}"#;
    let e = decode::<Offer>(later).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::Version {
            message: "handover offer",
            found: 2
        }
    );
    assert!(
        e.to_string().contains("protocol 2, this binary speaks [1]"),
        "{e}"
    );
    for m in [&b"{\"protocol\":0}"[..], b"{\"protocol\":4294967295}"] {
        assert!(matches!(
            decode::<PauseHeader>(m),
            Err(ProtocolError::Version { .. })
        ));
    }
    let req = HandoverRequest {
        protocol: 7,
        fastpath_threads: None,
    };
    assert!(matches!(
        decode::<HandoverRequest>(&encode(&req)),
        Err(ProtocolError::Version { found: 7, .. })
    ));
    assert!(matches!(
        check(&req),
        Err(ProtocolError::Version { found: 7, .. })
    ));
    assert_eq!(check(&HandoverRequest::default()), Ok(()));
    assert!(is_line("ready\n", READY) && is_line("ready", READY) && !is_line("read", READY));
}

#[test]
fn a_malformed_message_is_refused_naming_what_is_wrong() {
    let mut v = serde_json::to_value(offer()).unwrap();
    v["ports"][1]["kind"] = "floppy".into();
    let e = decode::<Offer>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(
        matches!(&e, ProtocolError::Malformed { message: "handover offer", why } if why.contains("floppy")),
        "{e}"
    );
    let mut v = serde_json::to_value(offer()).unwrap();
    v.as_object_mut().unwrap().remove("hash_seed");
    let e = decode::<Offer>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(e.to_string().contains("hash_seed"), "{e}");
    let mut v = serde_json::to_value(pause()).unwrap();
    v["free"] = (-1).into();
    assert!(matches!(
        decode::<PauseHeader>(&serde_json::to_vec(&v).unwrap()),
        Err(ProtocolError::Malformed { .. })
    ));
    for junk in [
        &b""[..],
        b"ready\n",
        b"[1,2]",
        b"{\"protocol\":\"one\"}",
        &[0xff; 9],
    ] {
        assert!(
            matches!(decode::<Offer>(junk), Err(ProtocolError::Malformed { .. })),
            "{junk:?}"
        );
    }
}

#[test]
fn oversized_frames_and_free_lists_are_refused() {
    assert_eq!(frame_len::<Offer>(100u64.to_le_bytes()), Ok(100));
    assert!(matches!(
        frame_len::<Offer>((MAX_HEADER + 1).to_le_bytes()),
        Err(ProtocolError::TooLarge { .. })
    ));
    assert!(matches!(
        frame_len::<PauseHeader>(u64::MAX.to_le_bytes()),
        Err(ProtocolError::TooLarge { .. })
    ));
    let big = vec![b' '; usize::try_from(MAX_HEADER).unwrap() + 1];
    assert!(matches!(
        decode::<Offer>(&big),
        Err(ProtocolError::TooLarge { .. })
    ));
    let mut p = pause();
    assert_eq!(p.free_bytes(), Ok(24));
    p.free = MAX_FREE + 1;
    assert!(p.free_bytes().is_err());
    p.free = u64::MAX;
    assert!(p.free_bytes().is_err());
}

#[test]
fn an_offer_names_each_descriptor_it_came_with_once() {
    let o = offer();
    assert_eq!(o.check_descriptors(7), Ok(()));
    // One short: the last link is missing.
    assert_eq!(
        o.check_descriptors(6),
        Err(ProtocolError::MissingDescriptor {
            message: "handover offer",
            index: 6
        })
    );
    let mut twice = offer();
    twice.listener_fd = 1;
    assert!(matches!(
        twice.check_descriptors(7),
        Err(ProtocolError::MissingDescriptor { index: 1, .. })
    ));
    assert_eq!(o.ports[1].name(), "veth-c");
}
