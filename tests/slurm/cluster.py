"""A real one-node Slurm cluster on 127.0.0.1 for tests (root, no systemd).

``LocalSlurm(workdir)`` writes its own ``slurm.conf`` / ``slurmdbd.conf`` / ``gres.conf`` /
``cgroup.conf`` under ``workdir/etc`` (Slurm programs find them through the ``SLURM_CONF``
environment variable; nothing under ``/etc`` is written) and starts, by hand:

* ``munged`` as user ``munge`` on its default socket (an already working munged is reused and
  left alone),
* ``mariadbd`` with ``--skip-networking`` and its data directory and socket in ``workdir``,
* ``slurmdbd``, ``slurmctld`` and ``slurmd`` in the foreground of their own sessions, on free
  TCP ports, with state, spool, logs and pid files in ``workdir``.

slurmd runs "configless" (``--conf-server``): it caches the config in its spool dir and links
``/run/slurm/conf`` to it. Programs that run inside jobs without ``SLURM_CONF`` find the cluster
through that link; this matters because the Snakemake jobstep plugin strips every ``SLURM_*``
variable (``SLURM_CONF`` included) before its nested ``srun``. Outside ``workdir`` only
``/run/munge`` (munged) and ``/run/slurm/conf`` (removed again by ``stop()``) are touched. An
existing ``/etc/slurm/slurm.conf`` would win over ``/run/slurm/conf`` for those nested calls, so
``start()`` warns when one exists.

The single node carries ``Feature=v100,rtx3090`` and two fake GPUs (``Gres=gpu:v100:2``, backed
by ``/dev/null`` and ``/dev/zero``) so that constraint / GRES routing can be tested without
hardware. Partitions: ``cpu`` (default) and ``gpu``, both on the same node. Account ``default``
holds user ``root``.

Use as a context manager or call ``start()`` / ``stop()``; pass ``env()`` to subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "squeue",
    "sinfo",
    "sacct",
    "sacctmgr",
    "scontrol",
    "scancel",
    "munged",
    "munge",
    "unmunge",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
)

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUNDIR = Path("/run/munge")
RUN_SLURM_CONF = Path("/run/slurm/conf")  # slurmd's link to its configless cache
ACCOUNT = "default"


class SlurmClusterError(RuntimeError):
    """The local cluster did not come up (message includes the daemon logs)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    """Names from REQUIRED_BINARIES that are not installed."""
    return [b for b in REQUIRED_BINARIES if _which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{path}: {e}>"
    return "\n".join(text[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalSlurm:
    """A one-node Slurm cluster (slurmctld + slurmd + slurmdbd + mariadb + munge)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        cluster_name: str = "sciquant",
        startup_timeout: float = 60.0,
        extra_config: str = "",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.cluster_name = cluster_name
        self.startup_timeout = startup_timeout
        self.extra_config = extra_config  # lines appended to slurm.conf
        self.etc = self.workdir / "etc"
        self.logdir = self.workdir / "log"
        self.rundir = self.workdir / "run"
        self.conf = self.etc / "slurm.conf"
        self.dbd_conf = self.etc / "slurmdbd.conf"
        self.datadir = self.workdir / "mysql"
        # Unix socket paths are limited to 107 bytes; fall back to a short directory.
        sock = self.rundir / "mysqld.sock"
        if len(str(sock)) > 100:
            sock = Path(tempfile.mkdtemp(prefix="slurm-db-")) / "mysqld.sock"
        self.mysql_socket = sock
        self.nodename: str | None = None
        self.ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._pidfiles: dict[str, Path] = {
            "slurmd": self.rundir / "slurmd.pid",
            "slurmctld": self.rundir / "slurmctld.pid",
            "slurmdbd": self.rundir / "slurmdbd.pid",
            "mariadbd": self.rundir / "mariadbd.pid",
        }
        self._started_munge = False
        self._munge_pidfile = MUNGE_RUNDIR / "munged.pid"
        self.startup_seconds: float | None = None
        self._last_probe = ""

    # ------------------------------------------------------------------ public API

    def env(self, base: dict | None = None) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster."""
        env = dict(os.environ if base is None else base)
        # Drop variables of an enclosing Slurm job, they confuse sbatch/srun.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30, **kw):
        """Run a Slurm client command against this cluster; returns CompletedProcess."""
        return subprocess.run(
            list(args),
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            **kw,
        )

    def start(self) -> LocalSlurm:
        t0 = time.monotonic()
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(
                f"missing binaries {missing}; run scripts/install-slurm.sh (as root)"
            )
        if os.geteuid() != 0:
            raise SlurmClusterError("LocalSlurm must run as root")
        if Path("/etc/slurm/slurm.conf").exists():
            warnings.warn(
                "/etc/slurm/slurm.conf exists: Slurm commands run inside test jobs without "
                "SLURM_CONF (e.g. the srun of the Snakemake jobstep) will use it instead of the "
                "local test cluster",
                stacklevel=2,
            )
        for d in (
            self.etc,
            self.logdir,
            self.rundir,
            self.workdir / "state",
            self.workdir / "spool",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.mysql_socket.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._init_mariadb()  # slowest step; the rest is quick
            self._write_configs()
            self._start_mariadb()
            self._start_daemon("slurmdbd", ["slurmdbd", "-D"])
            self._wait(self._dbd_ready, "slurmdbd accepting connections", ["slurmdbd"])
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i"])
            self._wait(self._ctld_ready, "slurmctld answering", ["slurmctld"])
            # slurmd runs "configless": it fetches slurm.conf/gres.conf/cgroup.conf from
            # slurmctld and caches them under its spool dir, linked from /run/slurm/conf.
            # Client commands without SLURM_CONF (e.g. the nested `srun` of the Snakemake
            # jobstep plugin, which strips all SLURM_* variables) find the config there.
            self._start_daemon(
                "slurmd",
                ["slurmd", "-D", "--conf-server", f"127.0.0.1:{self.ports['ctld']}"],
                without_conf=True,
            )
            self._setup_accounts()
            self._wait(self._node_idle, f"node {self.nodename} idle", ["slurmd", "slurmctld"])
            self._wait(self._sacct_ready, "sacct answering", ["slurmdbd", "slurmctld"])
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel jobs, then stop the daemons by the PIDs in their pid files and wait."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user", "root", check=False, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                    if out.returncode != 0 or not out.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd"):
            self._stop_one(name, timeout)
        self._remove_conf_link()
        if self._started_munge:
            pid = self._read_pid(self._munge_pidfile)
            if pid:
                self._kill_and_wait(pid, timeout)
            self._started_munge = False

    def _remove_conf_link(self) -> None:
        """Drop slurmd's /run/slurm/conf link if it points into this cluster's spool dir."""
        link = RUN_SLURM_CONF
        try:
            if link.is_symlink() and (self.workdir / "spool") in Path(os.readlink(link)).parents:
                link.unlink()
        except OSError:
            pass

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self, names=("slurmctld", "slurmd", "slurmdbd", "mariadbd"), lines=40) -> str:
        parts = []
        for name in names:
            parts.append(f"----- {name} ({self.logdir / (name + '.log')}) -----")
            parts.append(_tail(self.logdir / f"{name}.log", lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ daemons

    def _munge_works(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            if cred.returncode != 0:
                return False
            dec = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5)
            return dec.returncode == 0
        except (subprocess.SubprocessError, OSError):
            return False

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # a munged is already serving the default socket; reuse it
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_RUNDIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUNDIR, "munge", "munge")
        # a stale socket / pid file from a killed munged blocks a new one
        for stale in MUNGE_RUNDIR.glob("munge.socket.2*"):
            stale.unlink(missing_ok=True)
        subprocess.run(
            ["runuser", "-u", "munge", "--", "munged", "--force"],
            check=True,
            capture_output=True,
            timeout=20,
        )
        self._started_munge = True
        self._wait(self._munge_works, "munged answering", [])

    def _init_mariadb(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        log = self.logdir / "mariadb-install-db.log"
        with open(log, "w") as f:
            res = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={self.datadir}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--skip-name-resolve",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        if res.returncode != 0:
            raise SlurmClusterError(f"mariadb-install-db failed:\n{_tail(log)}")

    def _start_mariadb(self) -> None:
        cmd = [
            "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={self.datadir}",
            f"--socket={self.mysql_socket}",
            "--skip-networking",
            f"--pid-file={self._pidfiles['mariadbd']}",
            f"--log-error={self.logdir / 'mariadbd.log'}",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--innodb-flush-log-at-trx-commit=0",
            "--skip-log-bin",
            "--innodb-lock-wait-timeout=900",
        ]
        self._spawn("mariadbd", cmd)
        self._wait(self._mysql_ready, "mariadbd accepting connections", ["mariadbd"])
        self._mysql("CREATE DATABASE IF NOT EXISTS slurm_acct_db;")

    def _mysql(self, sql: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-uroot", "-e", sql],
            capture_output=True,
            text=True,
            timeout=10,
        )

    def _mysql_ready(self) -> bool:
        return self.mysql_socket.exists() and self._mysql("SELECT 1;").returncode == 0

    def _spawn(self, name: str, cmd: list[str], without_conf: bool = False) -> None:
        log = open(self.logdir / f"{name}.stdout", "w")
        env = self.env()
        if without_conf:
            del env["SLURM_CONF"]
        # the MariaDB client library used by slurmdbd reads the socket path from here
        env["MYSQL_UNIX_PORT"] = str(self.mysql_socket)
        self._procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()

    def _start_daemon(self, name: str, cmd: list[str], without_conf: bool = False) -> None:
        self._spawn(name, cmd, without_conf=without_conf)

    def _read_pid(self, path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _kill_and_wait(self, pid: int, timeout: float) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)

    def _stop_one(self, name: str, timeout: float) -> None:
        proc = self._procs.pop(name, None)
        pid = self._read_pid(self._pidfiles[name])
        pids = {p for p in (pid, proc.pid if proc else None) if p}
        for p in pids:
            if not ((proc is not None and p == proc.pid) or _is_same_program(p, name)):
                continue  # stale pid file of an earlier run: do not kill a stranger
            self._kill_and_wait(p, timeout)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # ------------------------------------------------------------------ readiness

    def _wait(self, predicate, what: str, daemons: list[str], timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        delay = 0.05
        while True:
            if predicate():
                return
            for name in daemons:
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with code {proc.returncode} while waiting for "
                        f"{what}\n{self._daemon_output(name)}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"timed out after {timeout or self.startup_timeout:.0f} s waiting for "
                    f"{what}\n----- last probe -----\n{self._last_probe}\n{self.logs()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _daemon_output(self, name: str) -> str:
        return f"----- {name} stdout/stderr -----\n" + _tail(self.logdir / f"{name}.stdout")

    def _quiet(self, *args: str) -> subprocess.CompletedProcess | None:
        """Run a readiness probe; remember its output for the error message."""
        try:
            res = self.run(*args, check=False, timeout=10)
        except subprocess.TimeoutExpired:
            self._last_probe = f"$ {' '.join(args)}\n<timed out after 10 s>"
            return None
        self._last_probe = (
            f"$ {' '.join(args)}  (exit {res.returncode})\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )
        return res

    def _dbd_ready(self) -> bool:
        res = self._quiet("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster")
        return res is not None and res.returncode == 0

    def _ctld_ready(self) -> bool:
        res = self._quiet("scontrol", "ping")
        return res is not None and res.returncode == 0 and "UP" in res.stdout

    def _setup_accounts(self) -> None:
        # slurmctld registers the cluster in slurmdbd itself; wait for that first
        def cluster_known() -> bool:
            res = self._quiet("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster")
            return res is not None and self.cluster_name in res.stdout.split()

        self._wait(cluster_known, "cluster registration in slurmdbd", ["slurmctld", "slurmdbd"])
        for args in (
            (
                "sacctmgr",
                "-i",
                "add",
                "account",
                ACCOUNT,
                f"cluster={self.cluster_name}",
                "Description=tests",
                "Organization=sciquant",
            ),
            (
                "sacctmgr",
                "-i",
                "add",
                "user",
                "root",
                f"account={ACCOUNT}",
                f"DefaultAccount={ACCOUNT}",
                f"cluster={self.cluster_name}",
            ),
        ):
            res = self.run(*args, check=False)
            text = res.stdout + res.stderr
            if (
                res.returncode != 0
                and "Nothing new added" not in text
                and ("already exists" not in text)
            ):
                raise SlurmClusterError(f"{' '.join(args)} failed:\n{text}\n{self.logs()}")

    def _node_idle(self) -> bool:
        res = self._quiet("sinfo", "-h", "-N", "-o", "%N %t")
        if res is None or res.returncode != 0:
            return False
        states = [line.split()[1] for line in res.stdout.splitlines() if line.strip()]
        return bool(states) and all(s == "idle" for s in states)

    def _sacct_ready(self) -> bool:
        res = self._quiet("sacct", "-n", "-X", "-o", "JobID")
        return res is not None and res.returncode == 0

    # ------------------------------------------------------------------ configuration

    def _node_line(self) -> str:
        res = subprocess.run(
            ["slurmd", "-C"],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in self.env().items() if k != "SLURM_CONF"},
        )
        first = next((ln for ln in res.stdout.splitlines() if ln.startswith("NodeName=")), None)
        if first is None:
            raise SlurmClusterError(f"`slurmd -C` gave no node line:\n{res.stdout}{res.stderr}")
        fields = dict(tok.split("=", 1) for tok in first.split())
        self.nodename = fields["NodeName"]
        return (
            f"{first} NodeAddr=127.0.0.1 NodeHostname={self.nodename} "
            f"Feature=v100,rtx3090 Gres=gpu:v100:2 State=UNKNOWN"
        )

    def _write_configs(self) -> None:
        for key in ("ctld", "slurmd", "dbd"):
            self.ports[key] = _free_port()
        node_line = self._node_line()
        w = self.workdir
        slurm_conf = f"""\
# generated by tests/slurm/cluster.py (LocalSlurm)
ClusterName={self.cluster_name}
SlurmctldHost={self.nodename}(127.0.0.1)
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool"}
SlurmctldPidFile={self._pidfiles["slurmctld"]}
SlurmdPidFile={self._pidfiles["slurmd"]}
SlurmctldLogFile={self.logdir / "slurmctld.log"}
SlurmdLogFile={self.logdir / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={self.etc / "plugstack.conf"}
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
MinJobAge=300
# batch jobs are requeueable only when submitted with --requeue (shows what the profile asks for)
JobRequeue=0
KillWait=5
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports["dbd"]}
AccountingStorageTRES=gres/gpu,gres/gpu:v100
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldParameters=enable_configless
{node_line}
PartitionName=cpu Nodes={self.nodename} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.nodename} Default=NO MaxTime=INFINITE State=UP
{self.extra_config}
"""
        self.conf.write_text(slurm_conf)
        (self.etc / "gres.conf").write_text(
            f"NodeName={self.nodename} Name=gpu Type=v100 File=/dev/null,/dev/zero\n"
        )
        (self.etc / "cgroup.conf").write_text(
            "# not used: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none\n"
            "CgroupAutomount=no\n"
        )
        (self.etc / "plugstack.conf").write_text("# no SPANK plugins\n")
        self.dbd_conf.write_text(
            f"""\
# generated by tests/slurm/cluster.py (LocalSlurm)
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={self.ports["dbd"]}
SlurmUser=root
DebugLevel=info
LogFile={self.logdir / "slurmdbd.log"}
PidFile={self._pidfiles["slurmdbd"]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
"""
        )
        self.dbd_conf.chmod(0o600)


def _is_same_program(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name.startswith(name)
    except OSError:
        return False
