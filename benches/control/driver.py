"""control-scale driver, run inside the VM's namespace.

Sends a change to the switch's control socket and, the moment the reply
arrives, starts sending numbered UDP datagrams to a target address; prints
the request-to-reply time and the number of the first datagram sent after
the reply (the sniffer on the underlay says where each one went).

usage: driver.py SOCKET OPS_FILE TARGET_IP SEQ_BASE
"""
import json, socket, sys, time

sock_path, ops_file, target, seq_base = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
req = b'{"cmd": "apply", "ops": ' + open(ops_file, "rb").read() + b"}\n"
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sock_path)
t0 = time.monotonic()
c.sendall(req)
buf = b""
while not buf.endswith(b"\n"):
    chunk = c.recv(65536)
    if not chunk:
        break
    buf += chunk
t1 = time.monotonic()
answer = json.loads(buf)
if "error" in answer:
    print("error", answer["error"])
    sys.exit(1)
seq = seq_base
first_after = seq
end = time.monotonic() + 0.3
while time.monotonic() < end:
    udp.sendto(seq.to_bytes(4, "big"), (target, 9999))
    seq += 1
    time.sleep(0.0002)
print("reply_ms %.3f applied_us %.1f first_after %d phases_us %s" % ((t1 - t0) * 1e3, answer.get("applied_us", 0), first_after, json.dumps(answer.get("phases_us"))))
