//! The Prometheus endpoint (`GET /metrics`) on a thread of its own.
//!
//! It used to be served inline on the control thread, where a loopback
//! client sending one byte every couple of seconds held that thread — and
//! with it `apply`, handovers and upgrades — for as long as it liked. Here
//! a slow or stuck scraper costs only this thread, and each connection has
//! an overall deadline ([`DEADLINE`]) for its request, not a per-read
//! timeout that a trickle resets. Connections are served one at a time:
//! a scrape is cheap, and one at a time bounds what scrapers can hold.
//!
//! Hand-written (a request line and one response) rather than an HTTP
//! crate: the endpoint is loopback-only, GET-only, and this is all of it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fastpath::dataplane::Request;
use tracing::{info, warn};

/// How long one scraper has to send its request line.
pub const DEADLINE: Duration = Duration::from_secs(1);
/// The request line's longest accepted length.
const MAX_LINE: usize = 8192;

/// What a page is made from.
pub struct Source {
    /// The fast-path threads (their counters).
    pub fast: crate::fastpaths::FastPaths,
    /// The coprocessors' shared state.
    pub shared: Arc<coprocessor::SharedLock>,
    /// Messages waiting in the punt queue.
    pub punt_depth: Arc<dyn Fn() -> usize + Send + Sync>,
    /// The coprocessor threads' loads.
    pub coprocessor_loads: Arc<Vec<crate::cores::Load>>,
}

impl Source {
    /// Everything in Prometheus text exposition.
    fn page(&self) -> Result<String> {
        let each = self.fast.ask(Request::Stats)?;
        let snap = fastpath::totals::total(each.clone()).context("no fast-path thread")?;
        let mut m = crate::metrics::Metrics::default();
        crate::metrics::fast_path(&mut m, &snap);
        crate::metrics::fast_path_threads(&mut m, &each);
        let sh = coprocessor::read(&self.shared);
        crate::metrics::coprocessor(&mut m, &sh, (self.punt_depth)());
        crate::metrics::coprocessor_loads(&mut m, &self.coprocessor_loads);
        Ok(m.finish())
    }
}

/// Bind `addr` (an error names the field).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(addr)
        .with_context(|| format!("switch: field `metrics`: binding {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve `/metrics` on `listener`, or — when taking over from a running
/// switch, which holds the address until it exits — on `addr` once it is
/// free (tried every second), until `stop` is set.
pub fn spawn(
    listener: Option<TcpListener>,
    addr: SocketAddr,
    source: Source,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut listener = listener;
            let mut last_try = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let Some(l) = &listener else {
                    if last_try.elapsed() >= Duration::from_secs(1) {
                        last_try = Instant::now();
                        listener = bind(addr).ok();
                        if listener.is_some() {
                            info!(address = %addr, "metrics at /metrics");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                match l.accept() {
                    Ok((s, _)) => {
                        if let Err(e) = serve(s, &source) {
                            warn!("metrics request failed: {e:#}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut fds = [libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(l),
                            events: libc::POLLIN,
                            revents: 0,
                        }];
                        fastpath::wake::wait_readable(&mut fds, 100);
                    }
                    Err(e) => {
                        warn!("metrics accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
}

/// Read the request line of `s` within [`DEADLINE`] overall.
fn request_line(s: &TcpStream) -> Result<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut line = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "no request line within {DEADLINE:?}");
        s.set_read_timeout(Some(left))?;
        let n = (&*s).read(&mut buf).context("reading the request")?;
        anyhow::ensure!(n > 0, "the client closed before its request line");
        line.extend_from_slice(&buf[..n]);
        anyhow::ensure!(line.len() <= MAX_LINE, "request line over {MAX_LINE} bytes");
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn serve(s: TcpStream, source: &Source) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_write_timeout(Some(DEADLINE))?;
    let line = request_line(&s)?;
    let (status, body) = if line.starts_with("GET /metrics ") {
        ("200 OK", source.page()?)
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let mut w = &s;
    write!(
        w,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}
