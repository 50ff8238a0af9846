"""control-scale sender, run inside the VM's namespace: sends numbered UDP
datagrams to TARGET:9999 from one socket (one 5-tuple for its whole life)
every 200 µs until killed, so a change is seen by traffic whose flow was
installed (or refused) before it.

usage: sender.py TARGET SEQ_BASE
"""
import socket, sys, time

target, seq = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 45678))
nxt = time.monotonic()
while True:
    s.sendto(seq.to_bytes(4, "big"), (target, 9999))
    seq += 1
    nxt += 0.0002
    d = nxt - time.monotonic()
    if d > 0:
        time.sleep(d)
