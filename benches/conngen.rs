//! New TCP connections per second, for `benches/lb`: a server that
//! answers each connection with one byte and closes it, and a client that
//! opens connections one after another on each of its threads (connect,
//! read to the end, close) for a fixed time. Both are plain blocking
//! sockets, a few system calls per connection each, so what limits the
//! rate is the path between them (the switch, or the kernel's load
//! balancer), not this program.
//!
//! `conngen server IP PORT` (runs until killed);
//! `conngen client IP PORT THREADS SECONDS` prints
//! `connections=<n> failed=<n> cps=<n>`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn server(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    // std listens with a backlog of 128; a burst of SYNs wants more.
    // SAFETY: listen(2) on the listener's own open socket.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let l = l.try_clone().expect("listener");
            std::thread::spawn(move || loop {
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(b"x");
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn client(addr: SocketAddr, threads: usize, secs: f64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 8];
                while Instant::now() < until {
                    let done = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(
                        |mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(1)))?;
                            let mut got = 0;
                            loop {
                                match s.read(&mut buf)? {
                                    0 => break,
                                    n => got += n,
                                }
                            }
                            Ok(got == 1)
                        },
                    );
                    match done {
                        Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    println!(
        "connections={n} failed={} cps={:.0}",
        failed.load(Ordering::Relaxed),
        n as f64 / secs
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let usage = "conngen server IP PORT | conngen client IP PORT THREADS SECONDS";
    let addr = |i: usize| -> SocketAddr {
        format!("{}:{}", a[i], a[i + 1])
            .parse()
            .unwrap_or_else(|_| panic!("{usage}"))
    };
    match a.get(1).map(String::as_str) {
        Some("server") if a.len() == 4 => server(addr(2)),
        Some("client") if a.len() == 6 => client(
            addr(2),
            a[4].parse().expect("THREADS"),
            a[5].parse().expect("SECONDS"),
        ),
        _ => panic!("{usage}"),
    }
}
