"""How many CPUs this process may use: its affinity, capped by a container's CPU quota.

torch and llama.cpp size their thread pools by the CPUs they see, which in a container with a CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) is the host's count: 64 threads on a 2-CPU quota are throttled
to a crawl.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _read_quota(quota: str, period: str) -> float | None:
    """CPUs a CFS quota allows: quota / period; None for no limit ("max", v1's -1) or a file we cannot read."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read_text(path: Path) -> str:
    """A cgroup file's text; "" when it is absent or unreadable (no such controller, another kernel)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_text().strip()
    return ""


def _self_and_ancestors(root: Path, cgroup: str) -> list[Path]:
    """root/cgroup and each directory above it up to root: a quota on an ancestor binds its children too."""
    parts = [part for part in cgroup.split("/") if part]
    if ".." in parts:  # a cgroup outside our namespace's view: only the root we see is ours to read
        parts = []
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path | None = None, membership: Path | None = None) -> float | None:
    """The CPUs this process's cgroup quota allows (cgroup v2 cpu.max, v1 cpu.cfs_quota_us/cfs_period_us; the
    tightest along its cgroup's ancestors), or None when there is none or it cannot be read.

    `root` is where the hierarchies are mounted, `membership` the process's /proc/self/cgroup; a container
    without its own cgroup namespace lists host paths that do not exist under `root`, so the walk up reaches
    the container's own cgroup, mounted at the top."""
    root, membership = root or CGROUP_ROOT, membership or PROC_SELF_CGROUP
    v2, v1 = "/", "/"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in membership.read_text().splitlines():
            hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if hierarchy == "0" and not controllers:
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    limits: list[float] = []
    for d in _self_and_ancestors(root, v2):
        fields = _read_text(d / "cpu.max").split()
        if len(fields) == 2 and (cpus := _read_quota(*fields)) is not None:
            limits.append(cpus)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / mount).is_dir():
            for d in _self_and_ancestors(root / mount, v1):
                quota, period = _read_text(d / "cpu.cfs_quota_us"), _read_text(d / "cpu.cfs_period_us")
                if (cpus := _read_quota(quota, period)) is not None:
                    limits.append(cpus)
            break
    return min(limits, default=None)


def _affinity() -> int:
    """CPUs the scheduler lets this process run on (what OpenMP sizes its pool by), else os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cpus(cgroup_root: Path | None = None, membership: Path | None = None) -> int:
    """CPUs this process may run on: its affinity (else os.cpu_count()), capped by a container's CPU quota
    rounded up (1.5 CPUs: 2 threads); at least 1."""
    cpus = _affinity()
    limit = cgroup_cpu_limit(cgroup_root, membership)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cap_omp_threads(environ: MutableMapping[str, str] = os.environ, cgroup_root: Path | None = None,
                    membership: Path | None = None) -> int | None:
    """Set OMP_NUM_THREADS to the CPU quota where it binds tighter than the affinity and nobody chose a count;
    the count set, else None. Must run before torch is imported: its pool reads the variable once, at load."""
    if "OMP_NUM_THREADS" in environ:
        return None
    limit = cgroup_cpu_limit(cgroup_root, membership)
    if limit is None or math.ceil(limit) >= _affinity():
        return None
    cpus = max(1, math.ceil(limit))
    environ["OMP_NUM_THREADS"] = str(cpus)
    return cpus


# libgomp's busy-wait between parallel regions (GOMP_SPINCOUNT): it spins 300,000 times by default when a process
# has no more threads than CPUs, and that assumes the CPUs are its alone. A second process on them (another run,
# the test suite, a tokenizer) then finds every core spinning: two demo-config benches side by side trained at
# 650-1,500 tok/s each against 12,300 alone. 1,000 spins (libgomp's own choice once threads outnumber CPUs) gave
# 6,300-6,900 each side by side and the same 12,200-13,200 alone; OMP_WAIT_POLICY=PASSIVE gave 7,100 side by
# side but cost ~11% alone (docs/benchmarks.md, 2026-12-05).
OMP_SPINCOUNT = "1000"


def limit_omp_spinning(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set GOMP_SPINCOUNT to OMP_SPINCOUNT unless the user set it or OMP_WAIT_POLICY; the value set, else None.
    Must run before torch is imported: libgomp reads it once, at load."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return None
    environ["GOMP_SPINCOUNT"] = OMP_SPINCOUNT
    return OMP_SPINCOUNT
