//! Reading from a peer by an overall deadline. A per-read timeout lets a
//! peer that trickles a byte at a time hold the reader for as long as it
//! likes (the control thread, or a paused switch waiting on a new binary);
//! [`Deadline`] fails every read once its moment has passed, whatever
//! arrived before.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A stream whose reads fail (TimedOut) from `at` on.
pub struct Deadline<'a> {
    s: &'a UnixStream,
    /// When reading stops; may be moved for the next exchange.
    pub at: Instant,
}

impl<'a> Deadline<'a> {
    /// Reads of `s` for `within` from now.
    pub fn new(s: &'a UnixStream, within: Duration) -> Deadline<'a> {
        Deadline {
            s,
            at: Instant::now() + within,
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let late = || io::Error::new(io::ErrorKind::TimedOut, "the peer did not finish in time");
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        self.s.set_read_timeout(Some(left))?;
        // A read that times out says "would block" (EAGAIN).
        self.s.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => late(),
            _ => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for c in b"hello there\n" {
                if (&a).write_all(&[*c]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let t = Instant::now();
        let mut line = String::new();
        let r = BufReader::new(Deadline::new(&b, Duration::from_millis(350))).read_line(&mut line);
        assert_eq!(r.map_err(|e| e.kind()).err(), Some(io::ErrorKind::TimedOut));
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        drop(b);
        writer.join().unwrap();
        // In time, the whole line.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"ready\n").unwrap();
        let mut line = String::new();
        BufReader::new(Deadline::new(&b, Duration::from_secs(1)))
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
    }
}
