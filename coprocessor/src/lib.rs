//! The coprocessor: vswitch's slow path (not built yet).
//!
//! It will receive every frame the fast path punts (flow-table misses and
//! "punt" actions) and run the pipeline of `shared/DESIGN.md` §5 —
//! anti-spoof, ARP proxy, DHCP server, routing, security groups with
//! connection tracking, NAT, ICMP — each stage in its own module
//! (`arp.rs`, `dhcp.rs`, `route.rs`, `acl.rs`, `conntrack.rs`, `nat.rs`).
//! It does no I/O: for each punted frame it returns frames to transmit and
//! flows (built from `flowtable::Action`) to install in the fast path, so
//! it can be tested and benchmarked without a kernel.
