#!/usr/bin/env bash
# A real multi-node Slurm cluster on one machine, for trying kolm's launchers before spending
# cluster time (and for kolm's own integration tests).
#
#   tools/local-slurm.sh start [--nodes N] [--cpus C]   install if needed, configure, start
#   tools/local-slurm.sh status                         sinfo of the running cluster
#   tools/local-slurm.sh stop                           stop the daemons this script started
#   eval "$(tools/local-slurm.sh env)"                  point sbatch/srun/squeue at it
#
# Installs slurm-wlm and munge with apt (Debian/Ubuntu, as root) when they are missing. All of
# its state (slurm.conf, spool, logs, pid files) lives under $KOLM_SLURM_DIR
# (default /var/lib/kolm-slurm); it never touches /etc/slurm. Several clusters can run side by
# side when each has its own KOLM_SLURM_DIR, KOLM_SLURM_PORT (controller; nodes take the next
# hundred) and KOLM_SLURM_PREFIX (node names; default kolm-n): kolm's tests use their own. It uses the machine's munge (and
# starts munged if it is not running), and adds one marked line to /etc/hosts so the node names
# resolve to 127.0.0.1. Running `start` again on a running cluster with the same shape does nothing.
set -euo pipefail

DIR=${KOLM_SLURM_DIR:-/var/lib/kolm-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${KOLM_SLURM_PORT:-16817}
NODE_PREFIX=${KOLM_SLURM_PREFIX:-kolm-n}
HOSTS_MARK="# kolm local slurm $NODE_PREFIX"

die() { echo "local-slurm: $*" >&2; exit 1; }
say() { echo "local-slurm: $*" >&2; }

need_root() { [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and apt-get is missing; install them by hand"
  say "installing slurm-wlm and munge with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  say "starting munged"
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- munged
  else
    munged --force
  fi
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not come up; see /var/log/munge/munged.log"
}

node_names() { local i; for ((i = 1; i <= $1; i++)); do echo "$NODE_PREFIX$i"; done; }

map_hosts() {
  local names
  names=$(node_names "$1" | tr '\n' ' ')
  local line="127.0.0.1 ${names% } $HOSTS_MARK"
  grep -qxF "$line" /etc/hosts && return
  local rest
  rest=$(grep -v " $HOSTS_MARK\$" /etc/hosts || true)
  printf '%s\n%s\n' "$rest" "$line" >/etc/hosts.kolm-new
  cat /etc/hosts.kolm-new >/etc/hosts   # in place: /etc/hosts is often a bind mount
  rm -f /etc/hosts.kolm-new
}

write_conf() {
  local nodes=$1 cpus=$2 mem_mb=$3 host
  host=$(hostname -s)
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
  {
    echo "# written by tools/local-slurm.sh: $nodes nodes on 127.0.0.1"
    echo "ClusterName=${NODE_PREFIX//-/}"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # A requeued job waits cred_expire seconds before it may start again (default 120).
    echo "AuthInfo=cred_expire=10"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "KillWait=30"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    local i
    for ((i = 1; i <= nodes; i++)); do
      echo "NodeName=$NODE_PREFIX$i NodeAddr=127.0.0.1 NodeHostname=$host Port=$((CTLD_PORT + 100 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=$NODE_PREFIX[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  } >"$CONF.new"
  mv "$CONF.new" "$CONF"
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

ctld_pid() { echo "$DIR/slurmctld.pid"; }
slurmd_pid() { echo "$DIR/slurmd-$1.pid"; }

cluster_up() {
  local nodes=$1 n
  running "$(ctld_pid)" || return 1
  for n in $(node_names "$nodes"); do running "$(slurmd_pid "$n")" || return 1; done
  return 0
}

wait_idle() {
  local nodes=$1
  for _ in $(seq 120); do
    local idle
    idle=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)
    [[ $idle -ge $nodes ]] && return 0
    sleep 0.5
  done
  SLURM_CONF=$CONF sinfo -N >&2 || true
  die "nodes did not become idle; see $DIR/log/"
}

cmd_start() {
  local nodes=2 cpus mem_mb
  cpus=$(nproc)
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      --cpus) cpus=$2; shift 2 ;;
      *) die "unknown option $1 (start takes --nodes N and --cpus C)" ;;
    esac
  done
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got $nodes"
  need_root
  install_packages
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  if cluster_up "$nodes" && grep -q "^# written by tools/local-slurm.sh: $nodes nodes" "$CONF" 2>/dev/null; then
    say "already running ($nodes nodes); $CONF"
    wait_idle "$nodes"
    return
  fi
  cmd_stop quiet
  start_munge
  map_hosts "$nodes"
  write_conf "$nodes" "$cpus" "$mem_mb"
  # -c: a fresh start, without jobs left from an earlier cluster.
  slurmctld -f "$CONF" -c
  local n
  for n in $(node_names "$nodes"); do
    slurmd -f "$CONF" -N "$n"
  done
  wait_idle "$nodes"
  say "started $nodes nodes ($(node_names "$nodes" | tr '\n' ' ')); logs in $DIR/log"
  say "use it with: export SLURM_CONF=$CONF"
}

stop_pidfile() {
  local f=$1
  running "$f" || { rm -f "$f"; return; }
  local pid
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

cmd_stop() {
  local f
  shopt -s nullglob
  for f in "$DIR"/slurmd-*.pid; do stop_pidfile "$f"; done
  [[ -f $(ctld_pid) ]] && stop_pidfile "$(ctld_pid)"
  shopt -u nullglob
  [[ ${1:-} == quiet ]] || say "stopped"
}

cmd_status() {
  [[ -f $CONF ]] || die "not configured; run: $0 start"
  running "$(ctld_pid)" || die "slurmctld is not running; run: $0 start"
  SLURM_CONF=$CONF sinfo -N
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start [--nodes N] [--cpus C] | stop | status | env" >&2; exit 2 ;;
esac
