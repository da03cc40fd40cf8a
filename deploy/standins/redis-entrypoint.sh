#!/bin/sh
# The stand-in redis:7's entrypoint: `redis-server ARGS` with no config file listens on every
# interface with protected mode off, like the official image's entrypoint.
set -e
case "$1" in
  -*) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ]; then
  case "$2" in
    ""|-*) set -- "$@" --protected-mode no ;;
  esac
fi
exec "$@"
