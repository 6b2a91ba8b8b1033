"""Job-array scripts for cluster schedulers: one array task per shard, each running `wsikit run`.

Every task finds its shard from the scheduler's array variables (see :func:`wsikit.jobs.scheduler_shard`),
takes per-slide locks and trusts only status records, so tasks can be re-submitted, overlap or die at
their time limit without doing a slide twice or counting a half-written one.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArrayJob:
    """What one array job asks of the scheduler and what each task runs."""

    config: Path
    slides: tuple[str, ...]
    job_dir: Path
    tasks: int = 4
    cpus: int = 4
    mem: str = "16G"
    gpus: int = 0
    time: str = "04:00:00"
    partition: str | None = None
    name: str = "wsikit"
    log_dir: Path | None = None  # default <job>/logs


def _command(job: ArrayJob) -> str:
    wsikit = shlex.quote(str(Path(sys.executable).with_name("wsikit")))
    slides = " ".join(shlex.quote(str(s)) for s in job.slides)
    return f"{wsikit} run {shlex.quote(str(job.config))} {slides} --out {shlex.quote(str(job.job_dir))}"


_HEADERS = {
    "slurm": lambda j, logs: [
        f"#SBATCH --job-name={j.name}",
        f"#SBATCH --array=0-{j.tasks - 1}",
        f"#SBATCH --cpus-per-task={j.cpus}",
        f"#SBATCH --mem={j.mem}",
        f"#SBATCH --time={j.time}",
        f"#SBATCH --output={logs}/%x_%A_%a.out",
        *([f"#SBATCH --gres=gpu:{j.gpus}"] if j.gpus else []),
        *([f"#SBATCH --partition={j.partition}"] if j.partition else []),
    ],
    # PBS Pro (PBS_ARRAY_INDEX) / Torque (PBS_ARRAYID): the array size is passed explicitly.
    "pbs": lambda j, logs: [
        f"#PBS -N {j.name}",
        f"#PBS -J 0-{j.tasks - 1}",
        f"#PBS -l select=1:ncpus={j.cpus}:mem={j.mem.lower()}b" + (f":ngpus={j.gpus}" if j.gpus else ""),
        f"#PBS -l walltime={j.time}",
        f"#PBS -o {logs}/",
        "#PBS -j oe",
        *([f"#PBS -q {j.partition}"] if j.partition else []),
        f"export WSIKIT_ARRAY_COUNT={j.tasks}",
    ],
    # Grid Engine: task ids are 1-based (SGE_TASK_FIRST/LAST give the range).
    "sge": lambda j, logs: [
        f"#$ -N {j.name}",
        f"#$ -t 1-{j.tasks}",
        f"#$ -pe smp {j.cpus}",
        f"#$ -l h_vmem={j.mem},h_rt={j.time}",
        f"#$ -o {logs}/",
        "#$ -j y",
        "#$ -cwd",
    ],
    # LSF: submit as `bsub < script`; the array range is in the job name.
    "lsf": lambda j, logs: [
        f'#BSUB -J "{j.name}[1-{j.tasks}]"',
        f"#BSUB -n {j.cpus}",
        f"#BSUB -M {j.mem}",
        f"#BSUB -W {j.time.rsplit(':', 1)[0]}",
        f"#BSUB -o {logs}/%J_%I.out",
        *([f'#BSUB -gpu "num={j.gpus}"'] if j.gpus else []),
    ],
}

SCHEDULERS = tuple(_HEADERS)


def array_script(job: ArrayJob, scheduler: str = "slurm") -> str:
    """The text of a job-array script for ``scheduler`` (slurm, pbs, sge, lsf)."""
    if scheduler not in _HEADERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    logs = job.log_dir or job.job_dir / "logs"
    lines = [
        "#!/usr/bin/env bash",
        *_HEADERS[scheduler](job, logs),
        "# Written by `wsikit slurm`. Each task tiles/extracts its own shard of the slides (from the",
        "# array variables); locks and status records make re-submission and overlap safe.",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(logs))}",
        _command(job),
        "",
    ]
    return "\n".join(lines)


def write_script(job: ArrayJob, path: str | os.PathLike, scheduler: str = "slurm") -> Path:
    """Write the array script (executable) and the log folder it names."""
    path = Path(path)
    (job.log_dir or job.job_dir / "logs").mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(array_script(job, scheduler))
    path.chmod(0o755)
    return path


def absolute_slides(slides: Sequence[str]) -> tuple[str, ...]:
    """Slide arguments made absolute (globs kept as patterns), since tasks may start elsewhere."""
    return tuple(str(Path(s).expanduser().absolute()) for s in slides)
