"""Bytes at the wire per site and round in a real loopback deployment (SuperLink + 2 SuperNodes,
TLS, node auth), vs the float32 size of the shared weights: every byte of the TLS connection
between a SuperNode and the SuperLink is counted by a TCP relay in between.

Usage: python -m benchmarks.wire
Each setting runs twice, 2 and 4 rounds; (bytes of the 4-round run - bytes of the 2-round run) / 2
is what one steady round costs (the app bundle download, discovery and start-up cancel out).
Settings: the default (weights packed into one array per dtype, each site's scores inside its next
train message) and ``transfer-dtype=float16``.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from pathlib import Path

from benchmarks.common import report
from fedseg.common.logs import setup_logging
from fedseg.common.models import ModelSpec, build_model, local_keys
from fedseg.simulations.synth import write_study
from tests.deployment.federation import Federation, free_port

SETTINGS = {
    "float32 (default)": "",
    "float16": "transfer-dtype='float16'",
}
CHANNELS = (16, 32, 64, 128)


class CountingRelay:
    """TCP relay 127.0.0.1:``port`` -> 127.0.0.1:``target`` that counts the bytes each way."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down


def main() -> None:
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="fedseg-wire-"))
    study = work / "study"
    write_study(study, sites=2, dims=2, cases=6, size=64, seed=0)
    spec = ModelSpec(2, 1, 3, CHANNELS, "instance")
    model = build_model(spec)
    local = local_keys(model, spec, "norm")
    float32 = sum(v.numel() * 4 for k, v in model.state_dict().items() if k not in local)
    fed = Federation(work / "fed")
    relays = {}
    rows = []
    try:
        fed.start_superlink()
        for site in ("site-a", "site-b"):
            relays[site] = CountingRelay(fed.port)
            fed.start_supernode(site, fed.node_key(site), study / site, work / "state" / site,
                                via_port=relays[site].port)
        for name, extra in SETTINGS.items():
            spent, dice = {}, None
            for rounds in (2, 4):
                before = {s: r.counts() for s, r in relays.items()}
                run = f"{name.replace(' ', '').replace('+', '-')}-{rounds}"
                out = fed.flwr("run", ".", "fedseg", "--stream", "--run-config",
                               f"num-server-rounds={rounds} local-epochs=1 batch-size=2 patch-size=64 "
                               f"channels='{','.join(map(str, CHANNELS))}' seed=0 {extra} "
                               f"output-dir='{work / 'runs'}' run-name='{run}'", timeout=900)
                assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
                spent[rounds] = {s: tuple(a - b for a, b in zip(r.counts(), before[s]))
                                 for s, r in relays.items()}
                dice = json.loads((work / "runs" / run / "summary.json").read_text())["in_federation"]["mean"]
            for site in relays:
                up = (spent[4][site][0] - spent[2][site][0]) / 2
                down = (spent[4][site][1] - spent[2][site][1]) / 2
                rows.append({"setting": name, "site": site, "bytes up/round": round(up),
                             "bytes down/round": round(down), "up ratio": up / float32,
                             "down ratio": down / float32, "4-round mean Dice": dice})
    finally:
        fed.stop()
    report("wire", rows, {"float32_bytes_shared": float32, "target_ratio": 1.10, "target_ratio_half": 0.55,
                          "model": f"UNet 2D channels {CHANNELS}, FedBN"})


if __name__ == "__main__":
    main()
