#!/bin/bash
# Start a throw-away one-node Slurm cluster on localhost (munge, slurmctld, slurmd; root
# only), run a command against it, and stop it again.
#
#   scripts/slurm_local.sh sbatch --wait -n 2 scripts/loft.sbatch --rounds 2
#
# The configuration, state and logs live in a temporary directory ($SLURM_LOCAL_DIR to keep
# them); SLURM_CONF points there while the command runs. Needs Debian's slurmctld, slurmd,
# slurm-client and munge (make deps-slurm).
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "slurm_local.sh: must run as root" >&2; exit 2; }
for b in munged slurmctld slurmd sbatch sinfo; do
    command -v "$b" >/dev/null || { echo "slurm_local.sh: $b not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 2; }
done

D=${SLURM_LOCAL_DIR:-$(mktemp -d /tmp/loft-slurm.XXXXXX)}
mkdir -p "$D/state" "$D/spool" "$D/munge"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
export SLURM_CONF="$D/slurm.conf"
cat > "$SLURM_CONF" <<CONF
ClusterName=loftlocal
SlurmctldHost=$HOST
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF

# munge: a key of our own and a private socket
MUNGE_SOCKET="$D/munge/munge.socket"
dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$D/munge/munge.key"
munged --force --key-file="$D/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" --seed-file="$D/munge/seed"
export MUNGE_SOCKET

cleanup() {
    local rc=$? pids=()
    for f in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/munge/munged.pid"; do
        if [[ -f "$f" ]]; then
            pids+=("$(cat "$f")")
            kill "${pids[-1]}" 2>/dev/null || true
        fi
    done
    # wait for the daemons to exit before removing their directory
    for _ in $(seq 1 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    [[ -n "${SLURM_LOCAL_DIR:-}" ]] || rm -rf "$D" 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT

# slurm talks to munge through the socket named in its plugin options
cat >> "$SLURM_CONF" <<CONF
AuthInfo=socket=$MUNGE_SOCKET
CONF
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        break
    fi
    sleep 0.5
done
if ! sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm_local.sh: the node did not come up; logs:" >&2
    tail -20 "$D/slurmctld.log" "$D/slurmd.log" >&2 || true
    exit 1
fi
"$@"
