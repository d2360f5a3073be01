#!/bin/sh
# One-shot Redis Cluster bootstrap (docker-compose.yml, service redis-cluster-init):
# joins the nodes given as host:port arguments into 3 primaries with 1 replica each.
# Idempotent: a cluster that is already formed (a restart with the nodes' volumes) is
# left as it is, so the service may run on every `up`.
set -eu
first="$1"
host="${first%:*}"
port="${first#*:}"

state() { redis-cli -h "$host" -p "$port" cluster info | tr -d '\r' | sed -n 's/^cluster_state://p'; }
known() { redis-cli -h "$host" -p "$port" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p'; }

if [ "$(known)" -gt 1 ]; then
    echo "cluster already formed ($(known) nodes, state $(state))"
else
    # --cluster-yes: accept the proposed layout (primaries first, replicas on other nodes)
    redis-cli --cluster create "$@" --cluster-replicas 1 --cluster-yes
fi
for _ in $(seq 1 60); do
    if [ "$(state)" = "ok" ]; then
        redis-cli --cluster check "$first"
        exit 0
    fi
    sleep 1
done
echo "cluster did not reach state ok within 60 s" >&2
exit 1
