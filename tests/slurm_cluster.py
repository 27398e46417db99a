"""A real single-node Slurm (slurmctld + slurmd + munge) started in the foreground for a test and
stopped by PID afterwards. How and why, in /work/shared/SLURM_NOTES.md terms: no systemd, so each
daemon runs under ``setsid`` and is stopped by its own PID; the config lives in a scratch folder
(``SLURM_CONF`` points clients and daemons at it, /etc/slurm is left alone) with free ports; the
settings that make requeue and scheduling fast enough for a test are marked below."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from ouroboros_ds.ring.utils import free_port

BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5).stdout
        return subprocess.run(["unmunge"], input=cred, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LocalSlurm:
    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=os.path.join(root, "slurm.conf"))
        self.host = socket.gethostname().split(".")[0]

    def _spawn(self, cmd, log):
        p = subprocess.Popen(cmd, stdout=open(os.path.join(self.root, log), "ab"), stderr=subprocess.STDOUT,
                             env=self.env, process_group=0)
        self.procs.append(p)
        return p

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "spool"), exist_ok=True)
        if not _munge_works():  # reuse a munged that is already up; otherwise start ours
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "munged", "-F"], "munged.log")
            self._until(_munge_works, timeout, "munge -n | unmunge")
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, env=self.env,
                              check=True).stdout.splitlines()[0]
        r = self.root
        conf = f"""ClusterName=ouroboros-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs otherwise wait 120 s for their credential to expire (minimum 5).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The next scheduler pass otherwise takes up to a minute.
SchedulerParameters=bf_interval=1,sched_interval=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
MinJobAge=3600
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(conf)
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-N", self.host], "slurmd.out")
        self._until(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout, timeout,
                    "sinfo shows the node idle")
        return self

    def _until(self, cond, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} before {what}; logs in {self.root}")
            time.sleep(0.1)
        raise TimeoutError(f"no '{what}' after {timeout} s; logs in {self.root}")

    def run(self, cmd, check=True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", self.env), check=check,
                              timeout=30, **kw)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id, cond, timeout, what) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(job_id)
            if cond(info):
                return info
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id}: no '{what}' after {timeout} s: {info}")

    def stop(self) -> None:
        """Cancel jobs, wait for the queue to empty, then TERM our daemons by PID (newest first)."""
        try:
            self.run(["scancel", "--user", "root"], check=False)
            end = time.time() + 20
            while time.time() < end and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.2)
        finally:
            for p in reversed(self.procs):
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
