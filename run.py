"""Entry point: `python run.py [group=option ...] [key=value ...]`, Hydra multirun with -m.

Composes configs/run.yaml (model + method + sampler + eval + paths), runs one sample-score-
record job per composed config, and prints where its samples, grid and CSV row went.

Scale-out: `torchrun --nproc_per_node=K run.py ...` shards the samples of each job over K
processes (rank 0 merges, scores and logs); `launcher=slurm` sends each job of a multirun to SLURM,
and a job with several GPUs there runs its tasks as one torch.distributed group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

ROOT = str(Path(__file__).resolve().parent)
sys.path.insert(0, ROOT)
# Jobs that submitit starts in fresh interpreters (launcher=local/slurm) import the project too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
import hydra.core.utils  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rfc.run.config import register_resolvers  # noqa: E402
from rfc.utils import distributed  # noqa: E402
from rfc.utils.files import atomic_write_text  # noqa: E402

register_resolvers()


def _save_hydra_file(cfg: object, filename: str, output_dir: Path) -> None:
    """Hydra's own files of the run folder (.hydra/config.yaml, hydra.yaml, overrides.yaml),
    written whole or not at all: a full disk or an unwritable folder is one line naming the
    file and exit 2, not a traceback and a 0-byte file (Hydra writes them before the job starts)."""
    path = Path(output_dir) / filename
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(cfg))
    except OSError as err:
        print(f"error: cannot write {path}: {err.strerror or err}; free space or fix the folder "
              "(hydra.run.dir), then run again", file=sys.stderr)
        sys.exit(2)


hydra.core.utils._save_config = _save_hydra_file  # the function Hydra's run_job calls for them


def _join_slurm_tasks(device: str) -> None:
    """A SLURM job with several tasks (one per GPU): export the torchrun-style variables from
    SLURM's and join one process group, so the job shards its samples like torchrun would."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        distributed.init_from_env(device)


_JOB_STARTED = False  # Hydra composed a config and called the job (not a composition error)


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> None:
    global _JOB_STARTED
    _JOB_STARTED = True
    from rfc.run.cli import run_job

    hc = HydraConfig.get()
    # The launcher in effect is Hydra's own choice (hydra/launcher=joblib, or what launcher=local|slurm
    # selects); the project's launcher group alone would miss a joblib override.
    launcher = hc.runtime.choices.get("hydra/launcher") or "basic"
    if launcher != "basic":
        _join_slurm_tasks(str(cfg.device))
    sweep = hc.sweep.dir if hc.mode.name == "MULTIRUN" else None
    n_jobs = hc.launcher.get("n_jobs") if launcher == "joblib" else None
    code = run_job(cfg, hc.runtime.output_dir, list(hc.overrides.task), sweep=sweep, launcher=launcher,
                   main=distributed.group().is_main, n_jobs=None if n_jobs is None else int(n_jobs))
    if code:
        sys.exit(code)


def _cli_device() -> str:
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("device=")), "auto")


if __name__ == "__main__":
    from rfc.run.cli import check_resume_argument

    problem = check_resume_argument(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    # Under torchrun: join the group first, so all ranks agree on one output folder.
    distributed.init_from_env(_cli_device())
    distributed.share_run_stamp()
    try:
        main()
    except SystemExit as exit_:
        # Hydra reports a config it cannot compose (an unknown option such as method=rfcc, a comma
        # list without -m, a mistyped value) on stderr and exits 1; that is a bad input, exit 2,
        # not a bug of the harness (the code 1 of run_job).
        if exit_.code == 1 and not _JOB_STARTED:
            sys.exit(2)
        raise
    finally:
        distributed.shutdown()
