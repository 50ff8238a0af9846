//! Per-output-port transmit lists for one batch.

use arrayvec::ArrayVec;
use flowtable::PortId;

use crate::frame::{Desc, BATCH};

/// Frames to transmit, grouped by output port. Only the ports a batch
/// touched are visited when the lists are drained or cleared.
#[derive(Debug)]
pub struct TxLists {
    lists: Vec<ArrayVec<Desc, BATCH>>,
    touched: ArrayVec<PortId, BATCH>,
}

impl TxLists {
    /// Lists for ports `0..ports`.
    pub fn new(ports: u16) -> TxLists {
        TxLists {
            lists: (0..ports).map(|_| ArrayVec::new()).collect(),
            touched: ArrayVec::new(),
        }
    }

    /// Queue `d` on `port`. `Err(false)` if the port does not exist,
    /// `Err(true)` if its list is full (more than a batch without a clear).
    #[inline(always)]
    /// Room for one more port (id = the current count).
    pub fn add_port(&mut self) {
        self.lists.push(ArrayVec::new());
    }

    pub fn push(&mut self, port: PortId, d: Desc) -> Result<(), bool> {
        let list = self.lists.get_mut(usize::from(port.0)).ok_or(false)?;
        if list.is_empty() && self.touched.try_push(port).is_err() {
            return Err(true);
        }
        list.try_push(d).map_err(|_| true)
    }

    /// The non-empty lists, in the order their ports were first used.
    pub fn iter(&self) -> impl Iterator<Item = (PortId, &[Desc])> + '_ {
        self.touched
            .iter()
            .filter_map(|p| self.lists.get(usize::from(p.0)).map(|l| (*p, l.as_slice())))
    }

    /// Frames queued in total.
    pub fn len(&self) -> usize {
        self.iter().map(|(_, l)| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    /// Empty every list (visiting only the touched ones).
    #[inline]
    pub fn clear(&mut self) {
        for p in self.touched.drain(..) {
            if let Some(l) = self.lists.get_mut(usize::from(p.0)) {
                l.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_port_and_clears() {
        let mut t = TxLists::new(4);
        let d = |a| Desc::new(a, 60);
        t.push(PortId(2), d(1)).unwrap();
        t.push(PortId(0), d(2)).unwrap();
        t.push(PortId(2), d(3)).unwrap();
        assert_eq!(t.push(PortId(4), d(4)), Err(false));
        let v: Vec<_> = t.iter().map(|(p, l)| (p.0, l.to_vec())).collect();
        assert_eq!(v, vec![(2, vec![d(1), d(3)]), (0, vec![d(2)])]);
        assert_eq!(t.len(), 3);
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.iter().count(), 0);
        for i in 0..BATCH as u64 {
            t.push(PortId(1), d(i)).unwrap();
        }
        assert_eq!(t.push(PortId(1), d(99)), Err(true));
    }
}
