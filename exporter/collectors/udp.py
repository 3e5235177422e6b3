from __future__ import annotations

from .base import SnapshotCollector, gauge, result_of


class UdpCollector(SnapshotCollector):
    def families(self):
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
        sockets, queues = self.families()
        for labels, count in udp.sockets.items():
            sockets.add(labels, count)
        for labels, size in udp.queue_bytes.items():
            queues.add(labels, size)
        yield sockets.metric
        yield queues.metric
