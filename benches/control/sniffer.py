"""control-scale sniffer, run inside the underlay namespace: prints
"SEQ OUTER_DST INNER_DST ARRIVAL" for every VXLAN datagram whose inner UDP
payload starts with a 4-byte sequence number (destination port 9999);
ARRIVAL is CLOCK_MONOTONIC in seconds when the sniffer read it.

usage: sniffer.py IFACE
"""
import socket, sys, time

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0))
while True:
    f = s.recv(4096)
    if len(f) < 14 + 20 + 8 + 8 + 14 + 20 + 8 + 4 or f[23] != 17:
        continue
    if int.from_bytes(f[36:38], "big") != 4789:
        continue
    inner = f[50:]
    if inner[23] != 17 or int.from_bytes(inner[36:38], "big") != 9999:
        continue
    seq = int.from_bytes(inner[42:46], "big")
    print(seq, socket.inet_ntoa(f[30:34]), socket.inet_ntoa(inner[30:34]), "%.6f" % time.monotonic(), flush=True)
