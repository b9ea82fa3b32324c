"""Run with ``tests/multihost.py --raw``: a TCP check between every pair of simulated hosts.

Host i (CMH_HOST) listens on 10.99.0.<i+1>:7000, connects to every other host (by its name in
/etc/hosts, hostN) and sends one line, accepts one line from each other host, and prints

    MESH host=hostI ipc=<ipc ns> shm=<dev:ino of /dev/shm> heard=host0,host2,...

Standard library only (no torch import), so it runs in well under a second.
"""
from __future__ import annotations

import os
import socket
import threading
import time

me, hosts = int(os.environ["CMH_HOST"]), int(os.environ["CMH_HOSTS"])
name = socket.gethostname()
srv = socket.create_server((socket.gethostbyname(f"host{me}"), 7000))
heard: list[str] = []


def serve() -> None:
    srv.settimeout(20)
    for _ in range(hosts - 1):
        conn, _ = srv.accept()
        with conn:
            heard.append(conn.makefile().readline().strip())


t = threading.Thread(target=serve)
t.start()
for peer in range(hosts):
    if peer == me:
        continue
    end = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection((f"host{peer}", 7000), timeout=2) as s:
                s.sendall(f"{name}\n".encode())
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
t.join()
st = os.stat("/dev/shm")
print(f"MESH host={name} ipc={os.readlink('/proc/self/ns/ipc')} shm={st.st_dev}:{st.st_ino} "
      f"heard={','.join(sorted(heard))}", flush=True)
