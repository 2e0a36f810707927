"""A real single-node Slurm runs the tiny CPU config through both batch scripts.

The fixture starts munge (unless one already answers) and a one-node Slurm (Debian's slurm-wlm;
installed with apt-get when missing and this runs as root) from a slurm.conf in a temporary
directory on free ports, and stops every daemon it started by its pid file. Both jobs go through the
same path as a multi-node GPU job: sbatch -> srun (one task per node) -> node_launch.sh -> torchrun
c10d rendezvous -> 4 gloo ranks, of `microep train` (train_embedded_cpu.sbatch: it must complete,
and its log show the per-layer balance figures and the balance report, its run directory hold the
metrics and the report) and of scripts/pretrain_gpt_microep.py, i.e. Megatron-LM's own pretrain()
from a checkout on CPU ranks (pretrain_megatron_lm.sbatch, submitted without GPUs: it must train,
log MicroEP's balance lines and save a Megatron checkpoint).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHECKOUTS, megatron_lm_env

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
PACKAGES = ("slurm-wlm", "munge")


def _run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def _ensure_slurm_installed():
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm-wlm and munge are not installed, and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        result = _run(cmd, env=env, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _munge_answers() -> bool:
    if not shutil.which("munge"):
        return False
    encoded = _run(["munge", "-n"])
    return encoded.returncode == 0 and _run(["unmunge"], input=encoded.stdout).returncode == 0


def _stop(pid_file: Path):
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _slurm_conf(root: Path, host: str) -> str:
    memory = max(1000, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 2048)
    return f"""\
ClusterName=microep-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _ensure_slurm_installed()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = []
    try:
        if not _munge_answers():
            if os.geteuid() != 0:
                pytest.skip("munge is not running and starting it needs root")
            # munged runs as the munge user and keeps its socket and pid file in /run/munge, its log
            # and seed in the package's own directories.
            run_dir = Path("/run/munge")
            run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.chown(run_dir, "munge", "munge")
            pid_file = run_dir / "munged.pid"
            result = _run(["runuser", "-u", "munge", "--", "munged", "--force"])
            assert result.returncode == 0, f"munged did not start: {result.stderr}"
            started.append(pid_file)
            assert _munge_answers(), "munged started but munge -n | unmunge fails"
        for daemon, pid_name in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            result = _run([daemon, "-f", str(conf)], env=env)
            started.append(root / pid_name)
            assert result.returncode == 0, f"{daemon} did not start: {result.stderr}\n{_logs(root)}"
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = _run(["sinfo", "-h", "-o", "%t"], env=env).stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        assert state == "idle", f"the node did not become idle (state {state!r})\n{_logs(root)}"
        yield env, root
    finally:
        for pid_file in reversed(started):
            _stop(pid_file)


def _logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")))


def _job_state(env, job_id: str) -> dict:
    text = _run(["scontrol", "show", "job", "-o", job_id], env=env).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _submit_and_wait(slurm, job_env, log: Path, script: str, *args: str, sbatch=()) -> str:
    """Submit ``scripts/slurm/<script>`` (arguments ``args``); the job's output once it has ended.
    Fails unless it COMPLETED with exit code 0."""
    env, root = slurm
    submitted = _run(
        ["sbatch", "--parsable", "--nodes", "1", *sbatch, f"--output={log}", f"--chdir={REPO}"]
        + [str(REPO / "scripts" / "slurm" / script), *args],
        env=job_env,
        cwd=REPO,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 600
    state = {}
    while time.monotonic() < deadline:
        state = _job_state(env, job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(2)
    output = log.read_text() if log.exists() else "(no job output)"
    if state.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        _run(["scancel", job_id], env=env)
    assert state.get("JobState") == "COMPLETED", (
        f"job {job_id}: {state.get('JobState')} (exit {state.get('ExitCode')})\n{output[-4000:]}\n{_logs(root)}"
    )
    assert state.get("ExitCode") == "0:0"
    return output


def test_tiny_cpu_config_runs_as_a_slurm_job(slurm, tmp_path):
    env, _ = slurm
    run_dir = tmp_path / "run"
    overrides = [
        f"training.train_iters={STEPS}",
        "training.log_interval=1",
        "training.save_interval=2",
        f"training.eval_interval={STEPS}",
        "training.lr_warmup_iters=1",
        "microep.replan_interval=2",
        "microep.replan_lag=1",
        "microep.planner=greedy",
        "embedded.corpus_megabytes=1.0",
        "embedded.validation_fraction=0.15",
        "embedded.report_policies=[static,microep]",
    ]
    job_env = {
        **env,
        "CONFIG": "tiny-cpu",
        "MICROEP_SET": " ".join(overrides),
        "PYTHON": sys.executable,
        "MICROEP_CACHE_DIR": str(tmp_path / "cache"),
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_PORT": str(_free_port()),
    }
    output = _submit_and_wait(
        slurm, job_env, tmp_path / "job.out", "train_embedded_cpu.sbatch", "--output", str(run_dir)
    )
    assert "1 node(s) x 4 CPU ranks" in output
    assert "max/mean before->after L1" in output and "tok/s" in output
    assert "balance report (measured figures, modeled replay and what it can say):" in output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all({"before", "after"} <= set(f) for r in steps for f in r["layers"].values())
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "report" / "replay" / "summary.csv").exists()
    assert (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "complete.json").exists()


def test_megatron_lm_pretrain_runs_as_a_slurm_job(slurm, megatron_lm, tmp_path):
    """pretrain_megatron_lm.sbatch, the GPU batch script, submitted without GPUs: the entry script runs
    Megatron-LM's pretrain() from the checkout on 4 CPU ranks (the newest checkout of the session)."""
    env, _ = slurm
    checkout = megatron_lm(CHECKOUTS[-1])
    save = tmp_path / "ckpt"
    job_env = megatron_lm_env(
        checkout,
        SLURM_CONF=env["SLURM_CONF"],
        CONFIG="tiny-cpu",
        MEGATRON_LM=str(checkout),
        GPUS_PER_NODE="4",  # ranks per node; the CPU harness takes over as no GPU is visible
        PYTHON=sys.executable,
        MASTER_PORT=str(_free_port()),
    )
    output = _submit_and_wait(
        slurm,
        job_env,
        tmp_path / "job.out",
        "pretrain_megatron_lm.sbatch",
        *("--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1"),
        *("--save", str(save), "--load", str(save), "--save-interval", "2"),
        sbatch=["--gpus-per-node=0"],  # the script asks for 8 GPUs per node; this node has none
    )
    assert "microep: 1 nodes x 4 GPUs" in output  # the GPU script's own line
    assert "no GPU visible: Megatron-LM's pretrain() on CPU ranks (gloo)" in output
    assert "iteration        2/       2" in output
    assert "MicroEP layer 1 step 1: max/mean before" in output
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
