#!/usr/bin/env bash
# Stop the local Slurm cluster that start_local_slurm.sh started in STATE_DIR.
#
#   scripts/slurm/stop_local_slurm.sh [--purge] STATE_DIR
#
# Stops only what STATE_DIR's pid files name: first it cancels the jobs still queued on that cluster (their
# slurmstepd processes are not children of slurmd and would outlive it), then slurmd(s), slurmctld, slurmdbd,
# mariadb (only if the start script started it) and munged (likewise). It removes the /etc/hosts line and the
# /etc/slurm/slurm.conf link that the start script added for this STATE_DIR. Installed packages stay.
# --purge also deletes STATE_DIR.
set -uo pipefail

PURGE=0
DIR=""
for a in "$@"; do
    case "$a" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        -*) echo "unknown option: $a" >&2; exit 2 ;;
        *) [[ -z "$DIR" ]] || { echo "usage: $0 [--purge] STATE_DIR" >&2; exit 2; }; DIR="$a" ;;
    esac
done
[[ -n "$DIR" ]] || { echo "usage: $0 [--purge] STATE_DIR" >&2; exit 2; }
[[ -d "$DIR" ]] || { echo "[local-slurm] $DIR does not exist: nothing to stop" >&2; exit 0; }
DIR="$(cd "$DIR" && pwd)"
ETC="$DIR/etc"; RUN="$DIR/run"
export SLURM_CONF="$ETC/slurm.conf"

log() { echo "[local-slurm] $*" >&2; }

alive() {
    local pid state
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' < "$1")"
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null || echo Z)"
    [[ "$state" != Z && "$state" != X ]]
}

stop_pidfile() {
    local pidfile="$1" name="$2" pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(tr -dc '0-9' < "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pidfile" || break; sleep 0.2; done
    if alive "$pidfile"; then log "$name did not stop in 20 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    rm -f "$pidfile"
}

# Jobs first, while the controller still runs: wait (up to 20 s) until the queue is empty.
if alive "$RUN/slurmctld.pid" && [[ -f "$SLURM_CONF" ]]; then
    if [[ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]]; then
        timeout 5 scancel --full --signal=KILL --state=RUNNING "--user=$(id -un)" >/dev/null 2>&1 || true
        timeout 5 scancel "--user=$(id -un)" >/dev/null 2>&1 || true
        for i in $(seq 100); do
            [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
fi

for f in "$RUN"/slurmd-*.pid; do [[ -e "$f" ]] && stop_pidfile "$f" "$(basename "$f" .pid)"; done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
if [[ -e "$RUN/mariadb.started-by-us" ]]; then
    log "stopping mariadb"
    timeout 30 mysqladmin --protocol=socket shutdown >/dev/null 2>&1 || true
    rm -f "$RUN/mariadb.started-by-us"
fi
[[ -e "$RUN/munged.pid" ]] && stop_pidfile "$RUN/munged.pid" munged

# The /etc/hosts line and the /etc/slurm/slurm.conf link of this state dir.
HOSTS_MARK="# local-slurm:$DIR"
if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place instead of replacing the file.
    grep -vF "$HOSTS_MARK" /etc/hosts > "$RUN/hosts.tmp" && cat "$RUN/hosts.tmp" > /etc/hosts
    rm -f "$RUN/hosts.tmp"
fi
if [[ -e "$RUN/etc-link" ]]; then
    if [[ -L /etc/slurm/slurm.conf && "$(readlink /etc/slurm/slurm.conf)" == "$ETC/slurm.conf" ]]; then
        rm -f /etc/slurm/slurm.conf
    fi
    rm -f "$RUN/etc-link"
fi
log "stopped the cluster of $DIR"
if [[ "$PURGE" == 1 ]]; then rm -rf "$DIR"; fi
exit 0
