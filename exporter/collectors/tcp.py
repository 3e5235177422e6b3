from __future__ import annotations

from .base import SnapshotCollector, gauge, result_of


class TcpCollector(SnapshotCollector):
    def families(self):
        return (
            gauge("tcp_connections", "TCP sockets by state, as netstat -ant counts them "
                  "(SYN_RECV includes request sockets).", ("state", "family")),
            gauge("tcp_connections_peak", "Largest TCP socket count per state seen over the "
                  "peak window (catches bursts between scrapes).", ("state",)),
            gauge("tcp_queue_bytes", "Sum of Recv-Q (receive) or Send-Q (send) bytes over the "
                  "TCP sockets in a state; LISTEN queues are in netstat_tcp_listen_*.",
                  ("state", "queue")),
            gauge("tcp_listeners", "Distinct listening address:port pairs, before the "
                  "--listen.limit cap on the per-listener metrics."),
            gauge("tcp_listen_queue_length", "Connections waiting in a listener's accept "
                  "queue (netstat -lnt Recv-Q); summed over SO_REUSEPORT sockets.",
                  ("address", "port")),
            gauge("tcp_listen_backlog", "Limit of a listener's accept queue (the listen() "
                  "backlog capped by somaxconn); summed over SO_REUSEPORT sockets.",
                  ("address", "port")),
            gauge("tcp_remote_connections", "TCP sockets per remote address (or network with "
                  "--remote.prefix-*) and state: the top --remote.top per state, the rest in "
                  "remote=\"other\", filtered ones in remote=\"excluded\"; summing over "
                  "remote gives netstat_tcp_connections for the state.", ("remote", "state")),
            gauge("process_connections", "TCP sockets per owning program (netstat -p) and "
                  "state: the top --collector.processes.top programs, the rest in "
                  "program=\"other\"; program=\"none\" for sockets no process holds (TIME_WAIT, "
                  "SYN_RECV, orphans), \"unknown\" for processes we could not look into.",
                  ("program", "state")),
            gauge("tcp_local_port_connections", "Server-side TCP sockets (local port is a "
                  "listening port) per port and state: the top --local-port.top ports, the "
                  "rest in port=\"other\".", ("port", "state")),
        )

    def collect(self):
        snapshot, tcp = result_of(self.get_snapshot, "tcp")
        if tcp is None:
            return
        (connections, peak, queues, listeners, queue_len, backlog, remote, programs,
         local_port) = self.families()
        for (state, family), count in tcp.connections.items():
            connections.add((state, family), count)
        for state, count in snapshot.peaks.items():
            peak.add((state,), count)
        for (state, queue), size in tcp.queue_bytes.items():
            queues.add((state, queue), size)
        listeners.add((), tcp.listeners_total)
        for lst in tcp.listeners:
            queue_len.add((lst.address, lst.port), lst.queue_length)
            if lst.backlog is not None:
                backlog.add((lst.address, lst.port), lst.backlog)
        families = [connections, peak, queues, listeners, queue_len, backlog]
        if tcp.remote is not None:
            for (state, address), count in tcp.remote.remote.items():
                remote.add((address, state), count)
            for (state, port), count in tcp.remote.local_port.items():
                local_port.add((port, state), count)
            families += [remote, local_port]
        if tcp.programs is not None:
            for (state, program), count in tcp.programs.connections.items():
                programs.add((program, state), count)
            families.append(programs)
        for family in families:
            yield family.metric
