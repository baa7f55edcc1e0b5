"""`rmdyn attribute --run DIR`: attribution along a real run and its linearised trajectory (docs/math.md §10.3,
§10.4), for the run's own reward type.

- Along the run: `dynamics.attribution.along_run.attribute_run` sums the per-step contributions over the run's
  checkpoints; the predicted total change of each eval item stands beside its actual change.
- The linearised trajectory: from the kernels at the run's θ_0 alone, the eval quantities of the linearised model
  along the run's own batch order (`linearised_trajectory`), against the real values at the checkpoints, and the
  first checkpoint where they part by more than a tolerance (a fraction of the largest actual change). The
  recursion is SGD's: for a run trained with Adam it is not computed, and the result says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["run_analysis"]


def run_analysis(
    run_dir: str,
    loaded: Any,
    train: Any,
    evalset: Any,
    *,
    reward: str | None,
    block: int,
    memory_budget_gb: float,
    tolerance: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """The along-run attribution and the linearised trajectory of one run directory, JSON-ready.

    Args:
      run_dir: a run directory of rmdyn's trainer with its checkpoints kept.
      loaded: the model the run started from.
      train, evalset: the run's training pairs and the eval items.
      reward: the reward type the caller expects ("ex" / "im") or None for the run's own.
      block: rows per backward-pass block.
      memory_budget_gb: the gradient memory budget of each computation.
      tolerance: the parting tolerance, a fraction of the largest actual change of any item.
      progress: progress bars.

    Returns:
      {"reward", "run" (`RunAttribution.to_dict()`), "trajectory": {steps, predicted, actual_steps, actual,
      parting_step, tolerance} or {"skipped": reason}}.

    Raises:
      ConfigError: a run of another reward type, model or training data (`load_run_model`), missing checkpoints.
    """
    from dynamics.attribution.along_run import attribute_run, load_run_model
    from dynamics.attribution.trajectory import (
        linearised_kernels,
        linearised_trajectory,
        parting_step,
        training_batches,
    )
    from dynamics.delta import reward_name

    result = attribute_run(run_dir, loaded.lm, loaded.params, train, evalset, reward=reward, block=block,
                           memory_budget_gb=memory_budget_gb, progress=progress)  # fmt: skip
    run = load_run_model(run_dir, loaded.lm, loaded.params, train, reward=reward)
    out: dict[str, Any] = {"reward": reward_name(run.rm), "run": result.to_dict()}
    if run.config.optimizer != "sgd":
        out["trajectory"] = {"skipped": f"the run used {run.config.optimizer}; the linearised recursion is SGD's"}
        return out
    steps = [int(s) for s in result.checkpoint_steps]
    kernels = linearised_kernels(run.rm, run.params, train, evalset, params_spec=run.config.params, block=block,
                                 memory_budget_gb=memory_budget_gb, progress=progress)  # fmt: skip
    batches = training_batches(run.config, train.batch_size)[: steps[-1]]
    traj = linearised_trajectory(kernels.train_kernel, kernels.eval_kernel, kernels.train_margin,
                                 kernels.eval_value, lr=run.config.lr, batches=batches,
                                 objective=run.config.objective_spec)  # fmt: skip
    predicted_at = traj.eval_value[np.asarray(steps)]
    parting = parting_step(predicted_at, np.asarray(result.eval_value), tolerance, relative=True)
    out["trajectory"] = {
        "steps": list(range(traj.steps + 1)),
        "predicted": traj.eval_value,
        "actual_steps": steps,
        "actual": result.eval_value,
        "parting_step": None if parting is None else steps[parting],
        "tolerance": tolerance,
    }
    return out
