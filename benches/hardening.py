"""Hostile traffic for benches/hardening, written raw (AF_PACKET) so a VM
can send what its kernel would not: segments of a connection its sockets
do not own, SYNs whose answers nobody acknowledges, VXLAN from chosen
VTEPs. Every loop is bounded by a count or a deadline.

  hardening.py synfin IFACE SRC_MAC DST_MAC SRC DST SPORT DPORT SECS RATE
      SYN and FIN segments, alternating, on one 5-tuple (a tracked
      connection's) at RATE per second for SECS.
  hardening.py synflood IFACE SRC_MAC DST_MAC SRC DST DPORT SECS RATE
      SYNs from new source ports at RATE per second for SECS (SRC ending
      in .0: from every address of that /24 in turn).
  hardening.py vxlan IFACE DST_MAC SRC_MAC OUTER_SRC OUTER_DST VNI
          INNER_SRC_MAC INNER_DST_MAC SRC DST COUNT RATE [BASE_PORT]
      COUNT UDP datagrams, each a new flow (source port BASE_PORT + i),
      inside VXLAN from OUTER_SRC, at RATE per second.
  hardening.py slowloris HOST PORT SECS
      Hold a connection to HOST:PORT sending one byte every second.
"""
import socket, struct, sys, time


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def ip(s):
    return socket.inet_aton(s)


def ipv4(src, dst, proto, payload, ttl=64):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, ttl, proto, 0, ip(src), ip(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def tcp(src, dst, sport, dport, flags, seq=1):
    t = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    pseudo = ip(src) + ip(dst) + struct.pack("!BBH", 0, 6, len(t))
    c = csum(pseudo + t)
    return t[:16] + struct.pack("!H", c) + t[18:]


def udp(sport, dport, payload):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def eth(dst, src, payload):
    return mac(dst) + mac(src) + b"\x08\x00" + payload


def raw(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    return s


def paced(rate, secs=None, count=None):
    """Yield frame numbers at `rate` per second until the deadline or count."""
    t0, i = time.monotonic(), 0
    while True:
        if count is not None and i >= count:
            return
        now = time.monotonic()
        if secs is not None and now - t0 >= secs:
            return
        due = t0 + i / rate
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        yield i
        i += 1


def main(a):
    if a[0] == "synfin":
        iface, smac, dmac, src, dst, sport, dport, secs, rate = a[1:10]
        s = raw(iface)
        frames = [eth(dmac, smac, ipv4(src, dst, 6, tcp(src, dst, int(sport), int(dport), f))) for f in (0x02, 0x11)]
        n = 0
        for i in paced(float(rate), secs=float(secs)):
            s.send(frames[i % 2])
            n += 1
        print("sent", n)
    elif a[0] == "synflood":
        iface, smac, dmac, src, dst, dport, secs, rate = a[1:9]
        s = raw(iface)
        n = 0
        many = src.endswith(".0")
        for i in paced(float(rate), secs=float(secs)):
            sport = 1024 + i % 60000
            a = src[:-1] + str(1 + i % 254) if many else src
            s.send(eth(dmac, smac, ipv4(a, dst, 6, tcp(a, dst, sport, int(dport), 0x02, seq=i))))
            n += 1
        print("sent", n)
    elif a[0] == "vxlan":
        iface, dmac, smac, osrc, odst, vni, imac_s, imac_d, src, dst, count, rate = a[1:13]
        base = int(a[13]) if len(a) > 13 else 20000
        s = raw(iface)
        n = 0
        for i in paced(float(rate), count=int(count)):
            inner = eth(imac_d, imac_s, ipv4(src, dst, 17, udp(base + i % 40000, 9, b"x" * 18)))
            vx = struct.pack("!II", 0x08000000, int(vni) << 8) + inner
            outer = ipv4(osrc, odst, 17, udp(40000 + i % 20000, 4789, vx))
            s.send(eth(dmac, smac, outer))
            n += 1
        print("sent", n)
    elif a[0] == "slowloris":
        host, port, secs = a[1], int(a[2]), float(a[3])
        c = socket.create_connection((host, port), timeout=5)
        t0 = time.monotonic()
        try:
            for b in b"GET /metrics HTTP/1.0\r\n" * 100:
                if time.monotonic() - t0 > secs:
                    break
                c.send(bytes([b]))
                time.sleep(1)
        except OSError as e:
            print("cut off after %.1f s: %s" % (time.monotonic() - t0, e))
            return
        print("held %.1f s" % (time.monotonic() - t0))
    else:
        sys.exit("unknown command " + a[0])


if __name__ == "__main__":
    main(sys.argv[1:])
