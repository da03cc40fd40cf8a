# Stand-in for haproxy:2.8 where no image registry is reachable (scripts/compose-smoke builds
# it from a debootstrapped Debian 12 base): Debian's HAProxy 2.6 (deploy/haproxy.cfg uses
# nothing newer than 2.6), run like the official image: as user haproxy, master-worker in the
# foreground, on /usr/local/etc/haproxy/haproxy.cfg, stopped gracefully by SIGUSR1.
ARG BASE=sse-broker-standin/debian:bookworm
FROM ${BASE}
LABEL org.sse-broker.standin="haproxy:2.8"
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /usr/local/etc/haproxy
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
