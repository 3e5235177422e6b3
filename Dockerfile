# netstat-exporter image. Build:  docker build -t netstat-exporter .
# Any Debian-like base with python3 and python3-venv works: --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Behind a TLS-inspecting proxy or with a PyPI mirror: --build-arg PIP_INDEX_URL=... and
# --build-arg PIP_CERT=<CA bundle path inside the build> (mount it with --volume).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The package and its dependencies go into a venv that the final stage copies whole.
RUN python3 -m venv /opt/netstat-exporter \
 && /opt/netstat-exporter/bin/pip install --no-cache-dir --disable-pip-version-check \
      --index-url "$PIP_INDEX_URL" ${PIP_CERT:+--cert "$PIP_CERT"} . \
 && /opt/netstat-exporter/bin/netstat-exporter --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="netstat-exporter" \
      org.opencontainers.image.description="Prometheus exporter for what netstat and ss show: TCP states, listen queues, per-remote counts, netstat -s" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/netstat-exporter /opt/netstat-exporter
# A fixed, unprivileged uid: socket counts need no privilege (netlink sock_diag and
# /proc/net are readable by anyone); see README for the collectors that need more.
USER 10101:10101
ENV NETSTAT_EXPORTER_WEB_LISTEN_ADDRESS=":10101"
EXPOSE 10101
# `netstat-exporter healthcheck` asks /healthz on the port and with the web config (TLS) the
# server was given through its environment; /healthz needs no password. Under mutual TLS it
# checks the handshake only (see README "Securing the endpoint").
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["/opt/netstat-exporter/bin/netstat-exporter", "healthcheck"]
ENTRYPOINT ["/opt/netstat-exporter/bin/netstat-exporter"]
