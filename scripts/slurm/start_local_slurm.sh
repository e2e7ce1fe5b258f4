#!/usr/bin/env bash
# Start a real, small Slurm cluster on this machine (for tests, CI and trying the Slurm launcher).
#
#   scripts/slurm/start_local_slurm.sh [--nodes 1|2|...|8] [--accounting] STATE_DIR
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf      # printed at the end; /etc/slurm/slurm.conf is linked too when free
#   ...  sinfo / sbatch / python launchers/slurm.py ...
#   scripts/slurm/stop_local_slurm.sh STATE_DIR
#
# What it does (root only; Debian/Ubuntu packages; no systemd needed):
#   * installs the missing packages among slurmctld slurmd slurm-client munge (+ slurmdbd mariadb-server with
#     --accounting) with apt-get --no-install-recommends; nothing is installed when they are present;
#   * starts munged (only when `munge -n | unmunge` fails), mariadb + slurmdbd (--accounting; sacct then works,
#     which submitit needs to tell COMPLETED/FAILED/CANCELLED apart), slurmctld and one slurmd per node;
#   * --nodes 1: one node "localhost"; --nodes 2: nodes n1 and n2 (two slurmd on their own ports, n1/n2 added to
#     /etc/hosts as 127.0.0.1) so that `--nodes 2` jobs run for real; up to 8 nodes the same way. Each node has
#     its own /dev/shm (see LOCAL_SLURM_PRIVATE_SHM);
#   * settings that make requeues fast for tests: AuthInfo=cred_expire=5 (a requeued job may start again after
#     6 s instead of 121 s), KillWait=5, SchedulerParameters=sched_interval=2,bf_interval=1.
# Everything (config, state, logs, pid files) lives in STATE_DIR; stop_local_slurm.sh stops exactly the
# daemons whose pid files are there. Re-running with the same settings does nothing when all is up; other
# settings restart the Slurm daemons.
#
# Environment: LOCAL_SLURM_PORT_BASE (default 6817: slurmctld; +1.. slurmd; +9 slurmdbd) and
# LOCAL_SLURM_CLUSTER (default "local", or "local<base>" for another base) to run a second cluster beside a
# first one; LOCAL_SLURM_CPUS (CPUs per node, default max(4, nproc): more than the real cores is allowed);
# LOCAL_SLURM_MEM_MB (per node; default 80% of the memory divided by the nodes); LOCAL_SLURM_PRIVATE_SHM=0 to let
# the nodes share the machine's /dev/shm (default: each slurmd runs in its own mount namespace with its own).
# Exit codes: 0 up; 2 usage; 3 not root; 4 packages could not be installed; 5 a daemon did not come up.
set -euo pipefail

usage() { echo "usage: $0 [--nodes N] [--accounting] STATE_DIR" >&2; exit 2; }

NODES=1
ACCOUNTING=0
DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) [[ $# -ge 2 ]] || usage; NODES="$2"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        --accounting) ACCOUNTING=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) [[ -z "$DIR" ]] || usage; DIR="$1"; shift ;;
    esac
done
[[ -n "$DIR" ]] || usage
[[ "$NODES" =~ ^[1-8]$ ]] || { echo "--nodes must be 1..8, got $NODES" >&2; exit 2; }
if [[ "$(id -u)" != 0 ]]; then
    echo "start_local_slurm.sh: needs root (it installs packages and runs slurmd/munged)" >&2
    exit 3
fi

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
ETC="$DIR/etc"; RUN="$DIR/run"; LOG="$DIR/log"; STATE="$DIR/state"
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld"
export SLURM_CONF="$ETC/slurm.conf"

log() { echo "[local-slurm] $*" >&2; }

PORT_BASE="${LOCAL_SLURM_PORT_BASE:-6817}"
if [[ -n "${LOCAL_SLURM_CLUSTER:-}" ]]; then CLUSTER="$LOCAL_SLURM_CLUSTER"
elif [[ "$PORT_BASE" == 6817 ]]; then CLUSTER=local
else CLUSTER="local$PORT_BASE"; fi
NPROC="$(nproc)"
CPUS="${LOCAL_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}"
MEM_KB="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
MEM_MB="${LOCAL_SLURM_MEM_MB:-$(( MEM_KB * 8 / 10 / 1024 / NODES ))}"
DBD_PORT=$(( PORT_BASE + 9 ))
# Each node gets a private /dev/shm (its own mount namespace), as separate machines have: libraries that name
# shared memory per node (MosaicML streaming) would otherwise collide between the fake nodes.
PRIVATE_SHM="${LOCAL_SLURM_PRIVATE_SHM:-1}"
if [[ "$PRIVATE_SHM" == 1 ]] && ! unshare --mount --propagation private true 2>/dev/null; then
    log "warning: cannot create mount namespaces (unshare -m; needs CAP_SYS_ADMIN): the nodes share /dev/shm"
    PRIVATE_SHM=0
fi
SHM_MB=$(( MEM_KB / 1024 / 2 ))
DB_NAME="slurm_acct_db_${CLUSTER}"

# ---------------------------------------------------------------------------------------------- helpers
alive() {  # alive PIDFILE: the process named there exists and is not a zombie (PID 1 here may not reap)
    local pid state
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' < "$1")"
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null || echo Z)"
    [[ "$state" != Z && "$state" != X ]]
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: SIGTERM, up to 20 s, then SIGKILL
    local pidfile="$1" name="$2" pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(tr -dc '0-9' < "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pidfile" || break; sleep 0.2; done
    if alive "$pidfile"; then log "$name did not stop in 20 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    rm -f "$pidfile"
}

wait_alive() {  # wait_alive PIDFILE NAME LOGFILE: the daemon wrote its pid file and still runs after a moment
    local i
    for i in $(seq 50); do alive "$1" && break; sleep 0.1; done
    sleep 0.2
    if ! alive "$1"; then
        log "$2 did not start; last lines of $3:"
        tail -n 30 "$3" >&2 2>/dev/null || true
        exit 5
    fi
}

# ---------------------------------------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge)
[[ "$ACCOUNTING" == 1 ]] && PKGS+=(slurmdbd mariadb-server mariadb-client)
MISSING=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$p")
done
if [[ ${#MISSING[@]} -gt 0 ]]; then
    log "installing ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${MISSING[@]}"; } >"$LOG/apt.log" 2>&1; then
        log "apt-get failed; last lines of $LOG/apt.log:"
        tail -n 20 "$LOG/apt.log" >&2
        exit 4
    fi
fi

# ---------------------------------------------------------------------------------------------- munge
if ! { munge -n | unmunge; } >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; } >/dev/null 2>&1
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force </dev/null >"$LOG/munged.out" 2>&1
    for i in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null || true
    { munge -n | unmunge; } >/dev/null 2>&1 || { log "munged does not answer"; cat "$LOG/munged.out" >&2; exit 5; }
    log "started munged"
fi

# ---------------------------------------------------------------------------------------------- config
if [[ "$NODES" == 1 ]]; then
    NODE_NAMES=(localhost)
    NODE_LINES="NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( PORT_BASE + 1 )) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    PART_NODES=localhost
else
    NODE_NAMES=()
    NODE_LINES=""
    for i in $(seq "$NODES"); do
        NODE_NAMES+=("n$i")
        NODE_LINES+="NodeName=n$i NodeHostname=n$i NodeAddr=127.0.0.1 Port=$(( PORT_BASE + i )) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"$'\n'
    done
    PART_NODES="$(IFS=,; echo "${NODE_NAMES[*]}")"
    # Node names must resolve (jobs use the first host name as MASTER_ADDR); one marked line per state dir.
    HOSTS_MARK="# local-slurm:$DIR"
    HOSTS_LINE="127.0.0.1 ${NODE_NAMES[*]} $HOSTS_MARK"
    if ! grep -qxF "$HOSTS_LINE" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite it in place instead of replacing the file.
        { grep -vF "$HOSTS_MARK" /etc/hosts; echo "$HOSTS_LINE"; } > "$RUN/hosts.tmp"
        cat "$RUN/hosts.tmp" > /etc/hosts
        rm -f "$RUN/hosts.tmp"
    fi
fi

# A fresh controller state restarts job ids at 1. The accounting database may still hold jobs of an earlier
# cluster with the same name, and sacct (hence submitit) would mix them up: start above the highest id there.
FIRST_JOB_ID=1
if [[ "$ACCOUNTING" == 1 ]]; then
    if [[ -s "$ETC/first_job_id" ]]; then FIRST_JOB_ID="$(cat "$ETC/first_job_id")"; fi
fi

if [[ "$ACCOUNTING" == 1 ]]; then
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

write_slurm_conf() {
    cat > "$1" <<EOF
# Generated by scripts/slurm/start_local_slurm.sh for $DIR (private /dev/shm per node: $PRIVATE_SHM)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire+1 s (default 121 s); needs a slurmctld restart to change.
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
FirstJobId=$FIRST_JOB_ID
SlurmctldPort=$PORT_BASE
SlurmdPort=$(( PORT_BASE + 1 ))
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
$NODE_LINES
PartitionName=debug Nodes=$PART_NODES Default=YES MaxTime=INFINITE State=UP
EOF
}

CHANGED=0
write_slurm_conf "$ETC/slurm.conf.new"
if ! cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" 2>/dev/null; then CHANGED=1; fi
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
echo "$([[ "$PRIVATE_SHM" == 1 ]] && echo private || echo shared)" > "$ETC/node_shm"   # for tests
for n in "${NODE_NAMES[@]}"; do mkdir -p "$STATE/d-$n"; done

# Client tools read /etc/slurm/slurm.conf unless SLURM_CONF is set: link it there when that path is free
# (or already ours), so that a plain `sinfo` works too. stop_local_slurm.sh removes the link.
mkdir -p /etc/slurm
if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]] || \
   [[ -L /etc/slurm/slurm.conf && ( "$(readlink /etc/slurm/slurm.conf)" == "$ETC/slurm.conf" || ! -e /etc/slurm/slurm.conf ) ]]; then
    ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
    echo "/etc/slurm/slurm.conf" > "$RUN/etc-link"
fi

# ---------------------------------------------------------------------------------------------- accounting
if [[ "$ACCOUNTING" == 1 ]]; then
    if ! mysqladmin --protocol=socket ping >/dev/null 2>&1; then
        install -d -o mysql -g mysql /run/mysqld
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >"$LOG/mariadb-install.log" 2>&1
        setsid -f mysqld_safe --user=mysql </dev/null >"$LOG/mysqld_safe.out" 2>&1
        for i in $(seq 150); do mysqladmin --protocol=socket ping >/dev/null 2>&1 && break; sleep 0.2; done
        mysqladmin --protocol=socket ping >/dev/null 2>&1 || { log "mariadb did not start"; tail -n 20 "$LOG/mysqld_safe.out" >&2; exit 5; }
        touch "$RUN/mariadb.started-by-us"
        log "started mariadb"
    fi
    mysql --protocol=socket -e "CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON \`$DB_NAME\`.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    if [[ ! -s "$ETC/first_job_id" ]]; then
        # Highest job id this cluster name has in the database (none: 0).
        MAXID="$(mysql --protocol=socket -N -B -e "SELECT COALESCE(MAX(id_job), 0) FROM \`$DB_NAME\`.\`${CLUSTER}_job_table\`" 2>/dev/null || echo 0)"
        FIRST_JOB_ID=$(( ${MAXID:-0} + 1 ))
        echo "$FIRST_JOB_ID" > "$ETC/first_job_id"
        write_slurm_conf "$ETC/slurm.conf"
        CHANGED=1
    fi
    umask 077
    cat > "$ETC/slurmdbd.conf.new" <<EOF
# Generated by scripts/slurm/start_local_slurm.sh for $DIR
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=$DB_NAME
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
    umask 022
    if ! cmp -s "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf" 2>/dev/null; then
        mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"
        stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
    else
        rm -f "$ETC/slurmdbd.conf.new"
    fi
    chmod 600 "$ETC/slurmdbd.conf"
    if ! alive "$RUN/slurmdbd.pid"; then
        slurmdbd </dev/null >"$LOG/slurmdbd.out" 2>&1   # reads slurmdbd.conf next to $SLURM_CONF; daemonises
        wait_alive "$RUN/slurmdbd.pid" slurmdbd "$LOG/slurmdbd.log"
        log "started slurmdbd"
    fi
    for i in $(seq 100); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    if ! timeout 5 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        timeout 10 sacctmgr -i add cluster "$CLUSTER" >"$LOG/sacctmgr.out" 2>&1 || { log "sacctmgr add cluster failed"; cat "$LOG/sacctmgr.out" >&2; exit 5; }
        CHANGED=1   # slurmctld must (re)start after the cluster exists
    fi
else
    stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
fi

# ---------------------------------------------------------------------------------------------- slurm daemons
SLURMD_PIDS=()
for f in "$RUN"/slurmd-*.pid; do [[ -e "$f" ]] && SLURMD_PIDS+=("$f"); done
if [[ "$CHANGED" == 1 ]]; then
    # Stop the old daemons completely before starting new ones (a slurmctld that is still saving its state
    # makes the new one exit).
    for f in "${SLURMD_PIDS[@]}"; do stop_pidfile "$f" "$(basename "$f" .pid)"; done
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
fi
for f in "${SLURMD_PIDS[@]}"; do   # slurmd of nodes that are no longer configured
    n="$(basename "$f" .pid)"; n="${n#slurmd-}"
    [[ " ${NODE_NAMES[*]} " == *" $n "* ]] || stop_pidfile "$f" "slurmd-$n"
done
if ! alive "$RUN/slurmctld.pid"; then
    # Start the controller first: a slurmd without a controller backs off for minutes.
    slurmctld </dev/null >"$LOG/slurmctld.out" 2>&1
    wait_alive "$RUN/slurmctld.pid" slurmctld "$LOG/slurmctld.log"
    log "started slurmctld (cluster $CLUSTER, port $PORT_BASE)"
fi
for n in "${NODE_NAMES[@]}"; do
    if ! alive "$RUN/slurmd-$n.pid"; then
        if [[ "$PRIVATE_SHM" == 1 ]]; then
            unshare --mount --propagation private sh -c \
                "mount -t tmpfs -o mode=1777,size=${SHM_MB}m tmpfs /dev/shm && exec slurmd -N $n" \
                </dev/null >"$LOG/slurmd-$n.out" 2>&1
        else
            slurmd -N "$n" </dev/null >"$LOG/slurmd-$n.out" 2>&1
        fi
        wait_alive "$RUN/slurmd-$n.pid" "slurmd -N $n" "$LOG/slurmd-$n.log"
        log "started slurmd for node $n"
    fi
done

# ---------------------------------------------------------------------------------------------- readiness
deadline=$(( SECONDS + 60 ))
while :; do
    out="$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null || true)"
    ready=1
    for n in "${NODE_NAMES[@]}"; do
        st="$(awk -v n="$n" '$1 == n {print $2}' <<<"$out" | head -n1)"
        case "$st" in
            idle*|mix*|alloc*|comp*) ;;
            down*|drain*|fail*) ready=0; timeout 5 scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
            *) ready=0 ;;
        esac
    done
    [[ "$ready" == 1 ]] && break
    if (( SECONDS > deadline )); then
        log "nodes not ready after 60 s: $(tr '\n' ';' <<<"$out")"
        for f in "$LOG"/slurmctld.log "$LOG"/slurmd-*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2 || true; done
        exit 5
    fi
    sleep 0.2
done
log "up: cluster $CLUSTER, nodes ${NODE_NAMES[*]}, $CPUS CPUs each$([[ "$ACCOUNTING" == 1 ]] && echo ", accounting on")"
echo "export SLURM_CONF=$ETC/slurm.conf"
