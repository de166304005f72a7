"""CPUs under container quotas: cgroup v1/v2 files in a temp directory, read by the real parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from felix.cli import main
from felix.cpus import OMP_SPINCOUNT, available_cpus, cap_omp_threads, cgroup_cpu_limit, limit_omp_spinning


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fake_cgroups(root: Path, membership: str, files: dict[str, str]) -> Path:
    """A cgroup tree under `root` holding `files` (relative path -> text), and a /proc/self/cgroup twin."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (proc := root / "proc-self-cgroup").write_text(membership)
    return proc


@pytest.mark.parametrize(("cpu_max", "limit"), [("max 100000\n", None), ("150000 100000\n", 1.5),
                                                ("50000 100000\n", 0.5), ("400000 100000\n", 4.0)])
def test_cgroup_v2_cpu_max_is_the_limit(tmp_path, cpu_max, limit):
    proc = fake_cgroups(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert cgroup_cpu_limit(tmp_path, proc) == limit


def test_cgroup_v2_limit_on_an_ancestor_binds_the_process(tmp_path):
    # systemd puts the quota on a slice and the process in a cgroup below it
    proc = fake_cgroups(tmp_path, "0::/app.slice/run.scope\n",
                        {"app.slice/cpu.max": "200000 100000\n", "app.slice/run.scope/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(tmp_path, proc) == 2.0


@pytest.mark.parametrize(("quota", "limit"), [("-1", None), ("250000", 2.5)])
def test_cgroup_v1_cfs_quota_is_the_limit(tmp_path, quota, limit):
    # Docker without a cgroup namespace: /proc/self/cgroup names the host's path, the mount holds the
    # container's own cgroup at its top
    proc = fake_cgroups(tmp_path, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
                        {"cpu,cpuacct/cpu.cfs_quota_us": quota + "\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(tmp_path, proc) == limit


@pytest.mark.parametrize("cpu_max", ["", "lots 100000\n", "100000 0\n", "100000\n"])
def test_damaged_cgroup_files_mean_no_limit(tmp_path, cpu_max):
    assert cgroup_cpu_limit(tmp_path, fake_cgroups(tmp_path, "0::/\n", {"cpu.max": cpu_max})) is None
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-too") is None


@pytest.mark.parametrize(("cpu_max", "cap"), [("50000 100000", 1), ("100000 100000", 1), ("150000 100000", 2),
                                              ("max 100000", None)])
def test_available_cpus_honours_the_cpu_quota_rounded_up(tmp_path, cpu_max, cap):
    # affinity alone gave 8 threads time-sliced onto a 1.5-CPU quota
    fake_cgroups(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    expected = affinity() if cap is None else min(affinity(), cap)
    assert available_cpus(tmp_path, tmp_path / "proc-self-cgroup") == expected


def test_omp_threads_are_capped_only_where_a_quota_binds_and_nobody_chose(tmp_path):
    fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    proc = tmp_path / "proc-self-cgroup"
    env: dict[str, str] = {}
    expected = 1 if affinity() > 1 else None
    assert cap_omp_threads(env, tmp_path, proc) == expected
    assert env == ({"OMP_NUM_THREADS": "1"} if expected else {})
    chosen = {"OMP_NUM_THREADS": "3"}
    assert cap_omp_threads(chosen, tmp_path, proc) is None and chosen == {"OMP_NUM_THREADS": "3"}
    fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "max 100000"})
    assert cap_omp_threads(unbound := {}, tmp_path, proc) is None and unbound == {}


def test_a_felix_verb_runs_torch_on_the_quota(tmp_path):
    # torch sizes its pool by the CPUs it sees, once, at import: `felix` sets the cap before it parses the verb
    # (whose module may import torch)
    # a 1-CPU quota under an affinity pinned at 8: the cap binds whatever this machine has (torch's default is
    # its core count, so on a 1-core machine the two agree)
    fake_cgroups(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    code = (f"import felix.cpus as c; c.CGROUP_ROOT = c.Path({str(tmp_path)!r}); "
            f"c.PROC_SELF_CGROUP = c.Path({str(tmp_path / 'proc-self-cgroup')!r}); c._affinity = lambda: 8\n"
            "from felix.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "import torch; print('threads', torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "threads 1"


def test_omp_spinning_is_limited_unless_the_user_chose(monkeypatch):
    assert limit_omp_spinning(env := {}) == OMP_SPINCOUNT and env == {"GOMP_SPINCOUNT": OMP_SPINCOUNT}
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        kept = dict(chosen)
        assert limit_omp_spinning(kept) is None and kept == chosen
    # the command sets it before any verb loads torch (here torch is loaded already; a real `felix` is not)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["GOMP_SPINCOUNT"] == OMP_SPINCOUNT
