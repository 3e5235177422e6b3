from __future__ import annotations

from .base import gauge


class UdpCollector:
    def collect(self, _snapshot, udp):
        sockets = gauge("udp_sockets", "UDP sockets, connected (connect() was called) or not.",
                        ("family", "state"))
        for labels, count in udp.sockets.items():
            sockets.add(labels, count)
        yield sockets.metric
        queues = gauge("udp_queue_bytes", "Sum of Recv-Q (receive) or Send-Q (send) bytes over "
                       "UDP sockets.", ("family", "queue"))
        for labels, size in udp.queue_bytes.items():
            queues.add(labels, size)
        yield queues.metric
