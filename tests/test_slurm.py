"""The SLURM profile on a real single-node Slurm cluster.

Debian's slurmctld and slurmd run on this machine, reachable on 127.0.0.1 only, without
authentication (auth/none, cred/none) and with one fake GPU (a gpu gres backed by /dev/null).
The tiny config's target is built through the repository's profile, with only its site-specific
placeholders filled in, and every job is then checked in the sbatch calls and on the Slurm side:
each rule ran as a Slurm job, the GPU rule with a GPU requested and allocated, the CPU rules
without one.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, run_snakemake

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

# The tiny config's report of one dataset, with one method: every stage, one GPU job, CI-sized.
DATASET = "femur"
METHODS = ["base"]
TARGET = f"results/{DATASET}/report.html"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {"train"}
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
# The job step's `srun` reads the configuration only from this fixed place.
CONF_DIR = Path("/etc/slurm")
NODE = "deepssm-node"
PARTITIONS = {"YOUR_PARTITION": "cpu", "YOUR_GPU_PARTITION": "gpu"}


def _unavailable(reason: str):
    """In CI the cluster test must run; elsewhere a missing prerequisite is a visible skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _install_slurm() -> None:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "srun", "squeue") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable(f"Slurm tools {missing} missing and installing {PACKAGES} needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            _unavailable(f"`{' '.join(command)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_hardware() -> str:
    """This machine's CPU layout as slurmd detects it (`slurmd -C`), without name or memory."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = [field for field in line.split() if field.split("=")[0] in ("CPUs", "Boards", "SocketsPerBoard",
                                                                           "CoresPerSocket", "ThreadsPerCore")]
    return " ".join(fields)


def _profile_memory_mb(profile: dict) -> int:
    requests = [profile["default-resources"]["mem_mb"]]
    requests += [resources["mem_mb"] for resources in profile.get("set-resources", {}).values()
                 if "mem_mb" in resources]
    return max(requests)


def _slurm_conf(state: Path, profile: dict, ports: dict[str, int]) -> str:
    host = socket.gethostname().split(".")[0]
    settings = {
        "ClusterName": "deepssmtest",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": ports["slurmctld"],
        "SlurmdPort": ports["slurmd"],
        # bind to the configured addresses (127.0.0.1), not to every interface
        "CommunicationParameters": "NoCtldInAddrAny,NoInAddrAny",
        "AuthType": "auth/none",
        "CredType": "cred/none",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "StateSaveLocation": state / "ctld",
        "SlurmdSpoolDir": state / "spool",
        "SlurmctldPidFile": state / "slurmctld.pid",
        "SlurmdPidFile": state / "slurmd.pid",
        "SlurmctldLogFile": state / "slurmctld.log",
        "SlurmdLogFile": state / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "MpiDefault": "none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "GresTypes": "gpu",
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        # finished jobs stay visible to squeue/scontrol (no accounting database to ask)
        "MinJobAge": 3600,
        # the node offers what the profile asks for, whatever this machine's memory
        "SlurmdParameters": "config_overrides",
        "ReturnToService": 2,
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines.append(f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 {_node_hardware()}"
                 f" RealMemory={_profile_memory_mb(profile)} Gres=gpu:1 State=UNKNOWN")
    lines += [f"PartitionName={name} Nodes={NODE} MaxTime=INFINITE State=UP" for name in PARTITIONS.values()]
    return "\n".join(lines) + "\n"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and tcp6."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                # the kernel prints each 32-bit word of the address in host (little-endian) order
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                addresses.add(socket.inet_ntop(family, raw))
    return addresses


def _wait_for_idle_node(daemons: list[subprocess.Popen], state: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(daemon.poll() is not None for daemon in daemons):
            break
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
        if result.returncode == 0 and f"{NODE} idle" in result.stdout:
            return
        time.sleep(1)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(state.glob("*.log")))
    raise RuntimeError(f"the single-node Slurm cluster did not come up:\n{logs}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running single-node cluster for the module's tests."""
    _install_slurm()
    if os.geteuid() != 0:
        _unavailable(f"starting slurmctld/slurmd and writing {CONF_DIR}/slurm.conf needs root")
    profile = yaml.safe_load(PROFILE.read_text())
    state = tmp_path_factory.mktemp("slurm")
    (state / "ctld").mkdir()
    (state / "spool").mkdir()
    CONF_DIR.mkdir(exist_ok=True)
    ports = {"slurmctld": _free_port(), "slurmd": _free_port()}
    written = {
        CONF_DIR / "slurm.conf": _slurm_conf(state, profile, ports),
        CONF_DIR / "gres.conf": f"NodeName={NODE} Name=gpu File=/dev/null\n",
    }
    backups = {path: path.read_bytes() for path in written if path.exists()}
    daemons = []
    try:
        for path, text in written.items():
            path.write_text(text)
        for command in (["slurmctld", "-D"], ["slurmd", "-D", "-N", NODE]):
            with open(state / f"{command[0]}.out", "w") as out:
                daemons.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
        _wait_for_idle_node(daemons, state)
        # with no authentication, nothing but this machine may reach the daemons
        for daemon, port in ports.items():
            assert _listening_addresses(port) == {"127.0.0.1"}, f"{daemon} listens on {_listening_addresses(port)}"
        yield
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for path in written:
            if path in backups:
                path.write_bytes(backups[path])
            else:
                path.unlink(missing_ok=True)


def _site_profile(folder: Path) -> Path:
    """The repository profile with its placeholders filled in for the test cluster, as a user would."""
    text = PROFILE.read_text()
    for placeholder, partition in PARTITIONS.items():
        assert re.search(rf"\b{placeholder}\b", text), f"{PROFILE} lost its {placeholder} placeholder"
        text = re.sub(rf"\b{placeholder}\b", partition, text)
    profile = yaml.safe_load(text)
    assert profile["default-resources"].pop("slurm_account") == "YOUR_ACCOUNT"
    # what the profile's header says to set on a cluster without accounting
    profile.update({"slurm-no-account": True, "slurm-status-command": "squeue"})
    # test run only: keep each job's Slurm log, and ask for the first status after 10 s, not
    # the 40 s a busy cluster needs (each further check waits 10 s longer, set by the plugin)
    profile.update({"slurm-keep-successful-logs": True, "slurm-init-seconds-before-status-checks": 10})
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _tiny_config(folder: Path) -> Path:
    config = yaml.safe_load(TINY.read_text())
    dataset = config["datasets"][DATASET]
    config["datasets"] = {DATASET: {**dataset, "methods": {m: dataset["methods"][m] for m in METHODS}}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _planned_jobs(workdir: Path, profile: Path, config: Path) -> Counter:
    """Jobs per rule in the target's DAG, from a dry run's job stats."""
    result = run_snakemake(workdir, TARGET, "--dry-run", "--profile", str(profile), configfile=config)
    assert result.returncode == 0, result.stderr
    table = re.search(r"^job\s+count\n-+\s+-+\n(.*?)^total", result.stdout + result.stderr, re.M | re.S)
    assert table, result.stdout
    return Counter({rule: int(count) for rule, count in (row.split() for row in table.group(1).splitlines())})


def _slurm_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld knows, as its detailed `scontrol show job` fields (JOB_GRES: allocated)."""
    out = subprocess.run(["scontrol", "-o", "-d", "show", "job"], capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        jobs[fields["JobId"]] = fields
    return jobs


def _rule_of(sbatch_call: str) -> str:
    """The rule a submission is for, from the job comment the executor sets (rule_<rule>_wildcards_...)."""
    return re.search(r"--comment '?rule_(\w+?)(?:_wildcards_\S*?)?'? ", sbatch_call).group(1)


def test_profile_runs_every_rule_as_a_slurm_job(slurm_cluster, tmp_path):
    profile = _site_profile(tmp_path / "profile")
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = _tiny_config(tmp_path)
    planned = _planned_jobs(workdir, profile, config)
    assert GPU_RULES <= set(planned) and set(planned) - GPU_RULES, planned

    started = time.monotonic()
    result = run_snakemake(workdir, TARGET, "--profile", str(profile), "--verbose", configfile=config)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    (tmp_path / "snakemake.log").write_text(output)
    assert result.returncode == 0, output[-6000:]
    assert (workdir / TARGET).is_file()

    # What the executor asked of Slurm: one sbatch call per job, named by its rule.
    sbatch = re.findall(r"sbatch call: (sbatch .*)", output)
    assert Counter(map(_rule_of, sbatch)) == planned
    for call in sbatch:
        rule = _rule_of(call)
        asks_gpu = re.search(r"--gpus=\d|--gres=\S*gpu", call) is not None
        assert asks_gpu == (rule in GPU_RULES), call
        expected_partition = PARTITIONS["YOUR_GPU_PARTITION" if rule in GPU_RULES else "YOUR_PARTITION"]
        assert re.search(rf"-p '?{expected_partition}'? ", call), call
        assert " -A " not in call, call

    # What Slurm ran: each submitted job id, completed, with a GPU allocation only for GPU rules.
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", output)
    assert len(job_ids) == len(sbatch)
    jobs = _slurm_jobs()
    ran_rules = Counter()
    for job_id in job_ids:
        job = jobs[job_id]
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"]).group(1)
        ran_rules[rule] += 1
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        if rule in GPU_RULES:
            assert job["TresPerJob"] == "gres:gpu:1" and job["JOB_GRES"] == "gpu:1", job
        else:
            assert "TresPerJob" not in job and job["JOB_GRES"] == "(null)", job
    assert ran_rules == planned

    gpu_call = next(call for call in sbatch if "rule_train" in call)
    cpu_call = next(call for call in sbatch if "rule_train" not in call)
    print(f"\nSlurm run of {TARGET}: {seconds:.0f} s, {len(job_ids)} jobs {dict(ran_rules)}")
    print(f"GPU rule sbatch: {re.sub(r' --wrap=.*', ' --wrap=...', gpu_call)}")
    print(f"CPU rule sbatch: {re.sub(r' --wrap=.*', ' --wrap=...', cpu_call)}")
