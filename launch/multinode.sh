#!/usr/bin/env bash
# Train on several nodes: run this once on every node (same config, same overrides); torchrun
# with the c10d rendezvous joins them, and restarts the whole job when a worker fails.
#
#   node 0:  NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 launch/multinode.sh CONFIG.yaml [key.sub=value ...]
#   node 1:  NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 launch/multinode.sh CONFIG.yaml [key.sub=value ...]
#
# Required:
#   NNODES          how many nodes the job has (a fixed number: distlm plans its batch split for
#                   one world size and refuses another)
#   NODE_RANK       0 on the node that RDZV_ENDPOINT names, 1..NNODES-1 on the others
#   RDZV_ENDPOINT   host:port of node 0, reachable from every node; node 0's torchrun serves the
#                   rendezvous store there (a TCPStore: no authentication, keep it on a private
#                   network)
# Optional:
#   NPROC           processes per node (default: the GPUs torch sees, or 2 without one)
#   MAX_RESTARTS    restarts of the job each node's torchrun allows (default 3); every restart
#                   resumes from the last checkpoint, and distlm refuses a start that would only
#                   repeat a crash (exit 80)
#   RDZV_ID         the job's name in the rendezvous (default distlm); the same on every node,
#                   and different for two jobs that share an endpoint
#   LOCAL_ADDR      this node's address as the other nodes reach it (default: its FQDN); set it
#                   where the hostname resolves to a loopback address, see below
#   JOIN_TIMEOUT    seconds to wait for all NNODES nodes, at the start and after each restart
#                   (default 600)
#   RDZV_CONF       more torchrun --rdzv-conf settings, key=value,key=value (they come last and
#                   win over is_host and join_timeout set here)
# Every node must see the same run.dir (a shared filesystem): ranks on every node write there
# (heartbeats, endings) and all read the checkpoint they resume from.
#
# What torchrun 2.13 does with these (read in torch/distributed/run.py and elastic/, and seen on
# two network namespaces by tests/test_two_hosts.py):
# - Node rank. Under c10d torchrun ignores --node-rank (it warns when it is not 0), so it is not
#   passed. A node's place (GROUP_RANK, hence its processes' global RANKs) is its position
#   among the nodes sorted by (LOCAL_ADDR or FQDN, torchrun's pid), decided at each rendezvous:
#   stable while the addresses are, arbitrary between nodes that share a name. NODE_RANK here
#   only says which node serves the rendezvous store (--rdzv-conf is_host). torchrun's own
#   guess compares the endpoint with the addresses of the hostname and misses any other
#   address (a second interface, a namespace): then no node serves it and every torchrun fails
#   after read_timeout. The store lives in node 0's torchrun: if that dies, the job does.
# - MASTER_ADDR. The first node in that order publishes LOCAL_ADDR (else its FQDN) and a free
#   port it draws as MASTER_ADDR:MASTER_PORT for every worker; with
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (below) its rank 0 worker serves a new TCPStore there
#   each attempt. Where the FQDN resolves to loopback (Debian's 127.0.1.1, a container, a
#   namespace: "localhost") the other nodes' workers connect to themselves and time out: set
#   LOCAL_ADDR on every node. The nodes must reach each other on such drawn ports, not only on
#   the endpoint's.
# - Gloo (CPU runs, and distlm's host-side agreement on GPUs too) binds by default the address
#   its hostname resolves to: the same loopback trap (connect timeout). distlm sets
#   GLOO_SOCKET_IFNAME itself when it is unset and MASTER_ADDR is not loopback (the interface
#   holding the local address that routes to MASTER_ADDR; each rank's log says which); set it
#   on every node to choose another.
# - Restarts. When a worker fails, its torchrun stops its local workers, counts a restart and
#   leaves the finished round to wait for the next; that round opens once every node has left
#   the old one. The other nodes' workers lose a peer (over gloo: exit 78 within
#   milliseconds), so their torchruns restart too, each counting against its own MAX_RESTARTS;
#   a node whose workers have not noticed (NCCL) is restarted anyway, uncounted, as soon as its
#   torchrun (polling every 0.1 s) sees a node waiting. With a fixed NNODES a round completes
#   as soon as the last node joins (last_call_timeout only applies to a MIN:MAX range): the
#   second rendezvous took 2-3 s here, then the workers' start-up. TORCHELASTIC_RESTART_COUNT
#   tells the workers each node's count.
# - Preemption. Signal every node's torchrun (SLURM does): a torchrun that gets SIGUSR1 forwards
#   it and exits 1 once its workers have saved and exited 75, but one that was not signalled
#   sees its workers' 75 as a failure and restarts them (seen: it then failed at once, node 0's
#   store being gone). exits.jsonl in the run folder holds the 75.
# - Timeouts. JOIN_TIMEOUT bounds the wait for all nodes, at the start and at every restart: a
#   node that never comes back fails the others after it. A dead torchrun is dropped from the
#   rendezvous after 15 s without heartbeats (keep_alive_interval 5 s x keep_alive_max_attempt
#   3). A node started before node 0 waits read_timeout (60 s) for its store; raise it in
#   RDZV_CONF (read_timeout=...) when nodes start further apart.
set -euo pipefail

usage="usage: NNODES=N NODE_RANK=R RDZV_ENDPOINT=host:port [NPROC=N] [MAX_RESTARTS=3] [RDZV_ID=distlm] \
[LOCAL_ADDR=addr] [JOIN_TIMEOUT=600] [RDZV_CONF=k=v,...] $0 CONFIG.yaml [key.sub=value ...]"
fail() { echo "$0: $1" >&2; echo "$usage" >&2; exit 2; }

[ $# -ge 1 ] || fail "no CONFIG.yaml given"
for name in NNODES NODE_RANK RDZV_ENDPOINT; do
  [ -n "${!name:-}" ] || fail "$name is not set (run this on every node with the same NNODES and RDZV_ENDPOINT)"
done
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES=$NNODES: give the number of nodes (a whole number, not a range)"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
  || fail "NODE_RANK=$NODE_RANK: give 0..$((NNODES - 1)) (0 on the node RDZV_ENDPOINT names)"
[[ "$RDZV_ENDPOINT" =~ ^.+:[0-9]+$ ]] || fail "RDZV_ENDPOINT=$RDZV_ENDPOINT: give host:port of node 0"

PYTHON=${PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=2; fi
fi

if [ "$NODE_RANK" -eq 0 ]; then is_host=true; else is_host=false; fi
rdzv_conf="is_host=$is_host,join_timeout=${JOIN_TIMEOUT:-600}${RDZV_CONF:+,$RDZV_CONF}"
local_addr=()
if [ -n "${LOCAL_ADDR:-}" ]; then local_addr=(--local-addr "$LOCAL_ADDR"); fi

# As launch/local.sh: without it, torch 2.13's restarted workers read the failed attempt's
# MASTER_ADDR/PORT from torchrun's shared store and connect to dead addresses (pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun forwards these to the workers (distlm saves and stops on SIGTERM/SIGUSR1/SIGUSR2,
# exit 75); a signal it does not handle kills torchrun itself and orphans the workers. torch
# 2.13 reads them from --signals-to-handle only: its launcher overwrites the
# TORCHELASTIC_SIGNALS_TO_HANDLE variable with that flag's value (default SIGTERM,SIGINT,SIGHUP,
# SIGQUIT) before it installs its handlers, so the variable alone does nothing (measured: a
# SIGUSR1 killed torchrun, exit 138, and the worker lived on).
signals=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-distlm}" --rdzv-conf "$rdzv_conf" \
  ${local_addr[@]+"${local_addr[@]}"} --signals-to-handle "$signals" --max-restarts "${MAX_RESTARTS:-3}" \
  -m distlm train "$@"
