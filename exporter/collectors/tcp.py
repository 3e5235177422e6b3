"""netstat -ant, -lnt and the per-remote and per-port counts (tcp view); netstat -p (processes
view). Each family is built by name where it is filled."""
from __future__ import annotations

from .base import gauge


class TcpCollector:
    def collect(self, snapshot, tcp):
        connections = gauge("tcp_connections", "TCP sockets by state, as netstat -ant counts "
                            "them (SYN_RECV includes request sockets).", ("state", "family"))
        for (state, family), count in tcp.connections.items():
            connections.add((state, family), count)
        yield connections.metric

        peak = gauge("tcp_connections_peak", "Largest TCP socket count per state seen over "
                     "the peak window (catches bursts between scrapes).", ("state",))
        for state, count in snapshot.peaks.items():
            peak.add((state,), count)
        yield peak.metric

        queues = gauge("tcp_queue_bytes", "Sum of Recv-Q (receive) or Send-Q (send) bytes "
                       "over the TCP sockets in a state; LISTEN queues are in "
                       "netstat_tcp_listen_*.", ("state", "queue"))
        for (state, queue), size in tcp.queue_bytes.items():
            queues.add((state, queue), size)
        yield queues.metric

        yield gauge("tcp_listeners", "Distinct listening address:port pairs, before the "
                    "--listen.limit cap on the per-listener metrics.").add(
                        (), tcp.listeners_total).metric

        queue_length = gauge("tcp_listen_queue_length", "Connections waiting in a listener's "
                             "accept queue (netstat -lnt Recv-Q); summed over SO_REUSEPORT "
                             "sockets.", ("address", "port"))
        for listener in tcp.listeners:
            queue_length.add((listener.address, listener.port), listener.queue_length)
        yield queue_length.metric

        backlog = gauge("tcp_listen_backlog", "Limit of a listener's accept queue (the "
                        "listen() backlog capped by somaxconn); summed over SO_REUSEPORT "
                        "sockets.", ("address", "port"))
        for listener in tcp.listeners:
            if listener.backlog is not None:  # the /proc source cannot tell it
                backlog.add((listener.address, listener.port), listener.backlog)
        yield backlog.metric

        if tcp.remote is None:
            return
        remote = gauge("tcp_remote_connections", "TCP sockets per remote address (or network "
                       "with --remote.prefix-*) and state: the top --remote.top per state, the "
                       "rest in remote=\"other\", filtered ones in remote=\"excluded\"; "
                       "summing over remote gives netstat_tcp_connections for the state.",
                       ("remote", "state"))
        for (state, address), count in tcp.remote.remote.items():
            remote.add((address, state), count)
        yield remote.metric

        local_port = gauge("tcp_local_port_connections", "Server-side TCP sockets (local port "
                           "is a listening port) per port and state: the top --local-port.top "
                           "ports, the rest in port=\"other\".", ("port", "state"))
        for (state, port), count in tcp.remote.local_port.items():
            local_port.add((port, state), count)
        yield local_port.metric

        client = gauge("tcp_client_time_wait", "Client-side TIME_WAIT sockets (we connected "
                       "out: the local port is not a listening one) per destination "
                       "address:port (exact: --remote.prefix-* not applied; "
                       "--remote.include/-exclude are, the rest in destination=\"excluded\"), "
                       "the top --remote.top and the rest in destination=\"other\". Each "
                       "holds an ephemeral port toward that destination: compare with "
                       "netstat_sockstat_ephemeral_ports.",
                       ("destination",))
        for destination, count in tcp.remote.client_time_wait.items():
            client.add((destination,), count)
        yield client.metric


class ProcessesCollector:
    """Reads the attribution the tcp view made with this view's socket owners."""

    def collect(self, snapshot, _owners):
        tcp = snapshot.results.get("tcp")
        if tcp is None or not tcp.ok or tcp.data.programs is None:
            return
        programs = gauge("process_connections", "TCP sockets per owning program (netstat -p) "
                         "and state: the top --collector.processes.top programs, the rest in "
                         "program=\"other\"; program=\"none\" for sockets no process holds "
                         "(TIME_WAIT, SYN_RECV, orphans), \"unknown\" for processes we could "
                         "not look into.", ("program", "state"))
        for (state, program), count in tcp.data.programs.connections.items():
            programs.add((program, state), count)
        yield programs.metric
