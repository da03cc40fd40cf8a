# Stand-in for redis:7 where no image registry is reachable (scripts/compose-smoke builds it
# from a debootstrapped Debian 12 base): Debian's redis-server 7.0, run like the official
# image: as user redis, in /data (a volume), with protected mode off when no config file is
# given (the official entrypoint does the same, or other containers could not connect).
ARG BASE=sse-broker-standin/debian:bookworm
FROM ${BASE}
LABEL org.sse-broker.standin="redis:7"
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
