from __future__ import annotations

from .base import gauge, result_of


class UdpCollector:
    def __init__(self, get_snapshot):
        self.get_snapshot = get_snapshot

    def describe(self):
        return [f.metric for f in self._families()]

    @staticmethod
    def _families():
        return (
            gauge("udp_sockets", "UDP sockets, connected (connect() was called) or not.",
                  ("family", "state")),
            gauge("udp_queue_bytes", "Sum of Recv-Q (receive) or Send-Q (send) bytes over "
                  "UDP sockets.", ("family", "queue")),
        )

    def collect(self):
        _snapshot, udp = result_of(self.get_snapshot, "udp")
        if udp is None:
            return
        sockets, queues = self._families()
        for labels, count in udp.sockets.items():
            sockets.add(labels, count)
        for labels, size in udp.queue_bytes.items():
            queues.add(labels, size)
        yield sockets.metric
        yield queues.metric
