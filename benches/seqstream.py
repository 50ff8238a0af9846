"""A paced UDP stream with sequence numbers, to count from outside the
switch what a live upgrade costs the traffic crossing it.

  seqstream.py send HOST PORT PPS   send 8-byte sequence numbers at PPS from
                                    one socket until killed
  seqstream.py recv PORT OUT        receive until SIGTERM, then write to OUT:
      received=<n> expected=<n> lost=<n> dup=<n> reordered=<n> max_gap_ms=<x>
    expected is the highest number seen + 1 (the sender is stopped well
    after the events measured, so a tail cut off by stopping is not one of
    them); lost = expected − distinct received; reordered counts datagrams
    that arrived after a higher number; max_gap_ms is the longest time
    between two consecutive arrivals (a blackout shows there).
"""
import signal, socket, sys, time


def send(host, port, pps):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gap, seq, nxt = 1.0 / pps, 0, time.monotonic()
    while True:
        try:
            s.sendto(seq.to_bytes(8, "big") + b"\0" * 10, (host, port))
        except OSError:
            pass  # counted as lost by the receiver
        seq += 1
        nxt += gap
        d = nxt - time.monotonic()
        if d > 0:
            time.sleep(d)


def recv(port, out):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    seen, dup, reordered, top, last, max_gap = set(), 0, 0, -1, None, 0.0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        try:
            b = s.recv(64)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        now = time.monotonic()
        if len(b) < 8:
            continue
        n = int.from_bytes(b[:8], "big")
        if n in seen:
            dup += 1
        seen.add(n)
        if n < top:
            reordered += 1
        top = max(top, n)
        if last is not None:
            max_gap = max(max_gap, now - last)
        last = now
    expected = top + 1
    with open(out, "w") as f:
        f.write("received=%d expected=%d lost=%d dup=%d reordered=%d max_gap_ms=%.2f\n" % (
            len(seen) + dup, expected, expected - len(seen), dup, reordered, max_gap * 1e3))


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        recv(int(sys.argv[2]), sys.argv[3])
