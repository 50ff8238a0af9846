//! SNAT port allocation: a pool of the host's external addresses, each
//! with its ports per protocol, handed out without collisions and
//! returned when the connection that held them ends. Each VM holds at
//! most `per_vm` ports; a refusal names the VM (by port) in the counters.
//!
//! A bitmap per (address, protocol) makes "is it free" one bit test and
//! finding a free port a word scan from a rotating cursor.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use flowtable::PortId;

/// Why no port was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatRefused {
    /// The VM holds its quota of ports.
    Quota,
    /// Every port of every pool address is taken.
    Exhausted,
}

/// Per-VM figures for `ctl nat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmNat {
    pub ports: u32,
    pub refused_quota: u64,
    pub refused_exhausted: u64,
}

const WORDS: usize = 65536 / 64;

/// The SNAT pool.
#[derive(Debug, Clone)]
pub struct NatPool {
    addrs: Vec<u32>,
    lo: u16,
    hi: u16,
    per_vm: u32,
    used: HashMap<(u32, u8), Box<[u64; WORDS]>>,
    cursor: u32,
    vms: HashMap<PortId, VmNat>,
    in_use: u64,
}

/// Free ports [`NatPool::allocate_where`] passes over at most (wanting
/// one port in 16, it settles for another once in 15 million).
pub const PREFER_TRIES: u32 = 256;

impl NatPool {
    /// Ports `lo..=hi` of each of `addrs`; at most `per_vm` per VM.
    pub fn new(addrs: Vec<Ipv4Addr>, lo: u16, hi: u16, per_vm: u32) -> NatPool {
        NatPool {
            addrs: addrs.into_iter().map(u32::from).collect(),
            lo: lo.min(hi),
            hi,
            per_vm,
            used: HashMap::new(),
            cursor: 0,
            vms: HashMap::new(),
            in_use: 0,
        }
    }

    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addrs.iter().map(|a| Ipv4Addr::from(*a))
    }

    /// Ports in use, all VMs.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Per-VM figures.
    pub fn vms(&self) -> &HashMap<PortId, VmNat> {
        &self.vms
    }

    /// A free (address, port) for protocol `proto`, charged to `vm`.
    pub fn allocate(&mut self, vm: PortId, proto: u8) -> Result<(u32, u16), NatRefused> {
        self.allocate_where(vm, proto, &|_, _| true)
    }

    /// [`NatPool::allocate`], preferring a free (address, port) `want`
    /// accepts: up to [`PREFER_TRIES`] free ones are passed over for it,
    /// then any will do.
    pub fn allocate_where(
        &mut self,
        vm: PortId,
        proto: u8,
        want: &dyn Fn(u32, u16) -> bool,
    ) -> Result<(u32, u16), NatRefused> {
        let mut passed = 0;
        let v = self.vms.entry(vm).or_default();
        if v.ports >= self.per_vm {
            v.refused_quota += 1;
            return Err(NatRefused::Quota);
        }
        let span = u32::from(self.hi - self.lo) + 1;
        for a in 0..self.addrs.len() {
            let addr = self.addrs[(a + self.cursor as usize) % self.addrs.len()];
            let bits = self
                .used
                .entry((addr, proto))
                .or_insert_with(|| Box::new([0; WORDS]));
            // Next fit from the cursor, wrapping once over the range.
            let mut off = self.cursor % span;
            let mut left = span;
            while left > 0 {
                let port = u32::from(self.lo) + off;
                let (w, b) = ((port / 64) as usize, port % 64);
                if b == 0 && left >= 64 && port + 63 <= u32::from(self.hi) && bits[w] == u64::MAX {
                    off = (off + 64) % span;
                    left -= 64;
                    continue;
                }
                // port ≤ hi, a u16.
                let p = u16::try_from(port).unwrap_or(self.hi);
                if bits[w] & (1 << b) == 0 && passed < PREFER_TRIES && !want(addr, p) {
                    passed += 1;
                } else if bits[w] & (1 << b) == 0 {
                    bits[w] |= 1 << b;
                    self.cursor = self.cursor.wrapping_add(off + 1);
                    self.in_use += 1;
                    let v = self.vms.entry(vm).or_default();
                    v.ports += 1;
                    return Ok((addr, p));
                }
                off = (off + 1) % span;
                left -= 1;
            }
        }
        if passed > 0 {
            // Free ports there are, none wanted: any will do.
            return self.allocate_where(vm, proto, &|_, _| true);
        }
        self.vms.entry(vm).or_default().refused_exhausted += 1;
        Err(NatRefused::Exhausted)
    }

    /// Mark a binding handed out before (a restored connection's).
    pub fn claim(&mut self, vm: PortId, proto: u8, addr: u32, port: u16) {
        let bits = self
            .used
            .entry((addr, proto))
            .or_insert_with(|| Box::new([0; WORDS]));
        let (w, b) = (usize::from(port / 64), port % 64);
        if bits[w] & (1 << b) == 0 {
            bits[w] |= 1 << b;
            self.in_use += 1;
            self.vms.entry(vm).or_default().ports += 1;
        }
    }

    /// Give back what [`NatPool::allocate`] handed out.
    pub fn release(&mut self, vm: PortId, proto: u8, addr: u32, port: u16) {
        let Some(bits) = self.used.get_mut(&(addr, proto)) else {
            return;
        };
        let (w, b) = (usize::from(port / 64), port % 64);
        if bits[w] & (1 << b) == 0 {
            return;
        }
        bits[w] &= !(1 << b);
        self.in_use -= 1;
        if let Some(v) = self.vms.get_mut(&vm) {
            v.ports = v.ports.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn pool(lo: u16, hi: u16, per_vm: u32) -> NatPool {
        NatPool::new(
            vec![
                Ipv4Addr::new(203, 0, 113, 10),
                Ipv4Addr::new(203, 0, 113, 11),
            ],
            lo,
            hi,
            per_vm,
        )
    }

    #[test]
    fn ports_never_collide_and_exhaustion_is_counted() {
        let mut p = pool(1000, 1099, 1000);
        let mut seen = HashSet::new();
        for i in 0..200u16 {
            let (a, port) = p.allocate(PortId(i % 3), 6).unwrap();
            assert!((1000..=1099).contains(&port));
            assert!(seen.insert((a, port)), "{a} {port} handed out twice");
        }
        assert_eq!(p.allocate(PortId(0), 6), Err(NatRefused::Exhausted));
        assert_eq!(p.vms()[&PortId(0)].refused_exhausted, 1);
        // Another protocol has its own ports.
        assert!(p.allocate(PortId(0), 17).is_ok());
        // A released port is handed out again.
        let (a, port) = *seen.iter().next().unwrap();
        p.release(PortId(1), 6, a, port);
        assert_eq!(p.allocate(PortId(1), 6), Ok((a, port)));
        // Releasing twice or something never given is harmless.
        p.release(PortId(1), 6, 1, 1);
        assert_eq!(p.in_use(), 201);
    }

    #[test]
    fn a_wanted_port_is_preferred_and_the_want_never_exhausts_a_pool() {
        let mut p = pool(1000, 1099, 1000);
        // Ports that are multiples of 8 wanted: found among the next free.
        for _ in 0..20 {
            let (_, port) = p
                .allocate_where(PortId(0), 17, &|_, port| port % 8 == 0)
                .unwrap();
            assert_eq!(port % 8, 0);
        }
        // Nothing wanted: every free port is still handed out, once.
        let mut seen = HashSet::new();
        while let Ok(b) = p.allocate_where(PortId(0), 17, &|_, _| false) {
            assert!(seen.insert(b), "{b:?} handed out twice");
        }
        assert_eq!(seen.len(), 200 - 20);
        assert_eq!(p.vms()[&PortId(0)].refused_exhausted, 1);
    }

    #[test]
    fn one_vm_is_held_to_its_quota_without_hurting_another() {
        let mut p = pool(1024, 65535, 3);
        for _ in 0..3 {
            p.allocate(PortId(1), 6).unwrap();
        }
        assert_eq!(p.allocate(PortId(1), 6), Err(NatRefused::Quota));
        assert_eq!(p.vms()[&PortId(1)].refused_quota, 1);
        assert!(p.allocate(PortId(2), 6).is_ok());
        let (a, port) = p.allocate(PortId(2), 6).unwrap();
        p.release(PortId(2), 6, a, port);
        assert_eq!(p.vms()[&PortId(2)].ports, 1);
    }

    #[test]
    fn the_whole_range_is_usable_including_its_edges() {
        let mut p = NatPool::new(vec![Ipv4Addr::new(1, 2, 3, 4)], 65530, 65535, 100);
        let mut got: Vec<u16> = (0..6)
            .map(|_| p.allocate(PortId(0), 17).unwrap().1)
            .collect();
        got.sort_unstable();
        assert_eq!(got, [65530, 65531, 65532, 65533, 65534, 65535]);
        assert!(p.allocate(PortId(0), 17).is_err());
    }
}
