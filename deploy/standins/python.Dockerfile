# Stand-in for python:3.11-slim where no image registry is reachable (scripts/compose-smoke
# builds it from a debootstrapped Debian 12 base): Debian's Python 3.11 and pip, with
# `python` and `pip` on PATH and pip allowed to install system-wide, as in the official image.
# It trusts the certificate authorities the build host added locally (local-ca/, copied by
# the script from /usr/local/share/ca-certificates: a site whose HTTPS goes through an
# intercepting proxy needs them for pip to reach the package index).
ARG BASE=sse-broker-standin/debian:bookworm
FROM ${BASE}
LABEL org.sse-broker.standin="python:3.11-slim"
ENV LANG=C.UTF-8
# PEP 668: Debian marks its Python "externally managed" and pip then refuses to install
# system-wide; the official image has no such marker (its Python is the image's own), so the
# stand-in removes it. pip installs into /usr/local, like the official image.
COPY local-ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3.11 python3-pip python-is-python3 \
    && rm -rf /var/lib/apt/lists/* \
    && update-ca-certificates \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
CMD ["python3"]
