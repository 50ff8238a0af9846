"""control-scale driver: sends one change to the switch's control socket
and prints when it sent it and when the reply came (CLOCK_MONOTONIC, the
clock the sniffer stamps arrivals with), and the switch's own figures.

usage: driver.py SOCKET OPS_FILE
prints: t0 <s> t1 <s> reply_ms <ms> applied_us <us> phases_us <json>
"""
import json, socket, sys, time

sock_path, ops_file = sys.argv[1], sys.argv[2]
req = b'{"cmd": "apply", "ops": ' + open(ops_file, "rb").read() + b"}\n"
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
print("t0 %.6f t1 %.6f reply_ms %.3f applied_us %.1f phases_us %s" % (
    t0, t1, (t1 - t0) * 1e3, answer.get("applied_us", 0), json.dumps(answer.get("phases_us"))))
