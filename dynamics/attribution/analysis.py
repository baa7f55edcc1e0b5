"""One attribution of a reward model: C, its rankings, the overlap statistics and the token-pair view
(docs/math.md §10). The Python API behind `rmdyn attribute`, one reward type per call.

    from dynamics.attribution.analysis import attribute
    result = attribute(rm, params, train, evalset, params_spec="all", lr=1e-3, top=5)
    result.contributions.contribution      # C, [M, N]
    result.statistics["spearman_overlap"]  # rank correlation of C with the token overlap
    result.save("attribution_im.json")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.attribution.contributions import Contributions, Mode, contribution_matrix
from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.overlap import ItemStates, OverlapScores, item_states, overlap_scores, overlap_statistics
from dynamics.attribution.tokens import TokenPairView, token_pairs
from dynamics.batches import PreferenceBatch
from dynamics.masks import prepare
from dynamics.objectives import Objective, reward_model
from dynamics.rewards import ImplicitRM, RewardModel

__all__ = ["Attribution", "attribute", "largest_entries", "source_ranks"]


@dataclasses.dataclass(frozen=True)
class Attribution:
    """The attribution of one reward type (docs/math.md §10).

    Attributes:
      contributions: C and its factors (`Contributions`).
      scores: token overlap O, indicator term I and hidden similarity H (`OverlapScores`), [M, N] each.
      statistics: `overlap_statistics` of C against the scores.
      rankings: per eval item i, {"up": training pairs with the largest C_ij > 0, "down": the most negative}.
      token_views: for the IM-RM, the token-pair view (`TokenPairView`) of the largest |C_ij|, keyed "i,j";
        empty for the EX-RM (its head closed form is η w_j H_ij: no token sum).
    """

    contributions: Contributions
    scores: OverlapScores
    statistics: dict[str, Any]
    rankings: list[dict[str, list[int]]]
    token_views: dict[str, TokenPairView]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, the scores and the token views as dicts."""
        from dynamics.outputs import jsonable

        return jsonable(
            {
                "contributions": self.contributions.to_dict(),
                "scores": dataclasses.asdict(self.scores),
                "statistics": self.statistics,
                "rankings": self.rankings,
                "token_views": {k: v.to_dict() for k, v in self.token_views.items()},
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def largest_entries(contribution: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The n entries (i, j) of largest |C_ij|, largest first (ties by position)."""
    order = np.argsort(-np.abs(contribution), axis=None, kind="stable")[:n]
    return [tuple(int(x) for x in np.unravel_index(f, contribution.shape)) for f in order]


def source_ranks(contribution: np.ndarray, train_rows: Sequence[int | None]) -> dict[str, Any] | None:
    """Where each eval item ranks the training pair it derives from (e.g. the pair it paraphrases).

    rank_i = 1 + #{j : C_ij > C_i,src(i)} (1: its source pushes it up more than any other pair).

    Returns:
      None if no item names a source; else n, mean_rank, median_rank, top1 and top5 (the fractions of items whose
      source ranks first / in the first five), chance_mean_rank ((N + 1) / 2), and the per-item ranks.
    """
    items = [(i, s) for i, s in enumerate(train_rows) if s is not None]
    if not items:
        return None
    ranks = [int(1 + np.sum(contribution[i] > contribution[i, s])) for i, s in items]
    r = np.asarray(ranks, np.float64)
    return {
        "n": len(ranks), "mean_rank": float(r.mean()), "median_rank": float(np.median(r)),
        "top1": float(np.mean(r == 1)), "top5": float(np.mean(r <= 5)),
        "chance_mean_rank": (contribution.shape[1] + 1) / 2, "ranks": ranks,
    }  # fmt: skip


def attribute(
    rm: RewardModel,
    params,
    train: PreferenceBatch,
    evalset: EvalSet,
    *,
    params_spec: str = "all",
    lr: float = 1e-3,
    mode: Mode = "exact",
    project: int | None = None,
    seed: int = 0,
    top: int = 5,
    token_entries: int = 4,
    train_rows: Sequence[int | None] | None = None,
    block: int = 8,
    memory_budget_gb: float = 8.0,
    mesh=None,
    progress: bool = False,
    objective: Objective | None = None,
) -> Attribution:
    """C (`contribution_matrix`), per-item rankings, overlap statistics and, for the IM-RM, token-pair views.

    Args:
      rm, params: the reward model and its parameters at θ.
      train, evalset: N training pairs and M eval items.
      params_spec, lr, mode, project, seed, block, memory_budget_gb, mesh, progress, objective: as
        `contribution_matrix` (a length-normalised SimPO reward gets no token-pair view: statistics["token_view"]
        says so).
      top: training pairs kept per eval item and direction in `rankings`, and token pairs per token view.
      token_entries: how many of the largest |C_ij| get a token-pair view (IM-RM).
      train_rows: per eval item, the training pair it derives from, or None: adds `source_ranks` to the
        statistics (as "source").

    Raises:
      ConfigError, DataError: as `contribution_matrix`.
    """
    if train_rows is not None:
        _check_train_rows(train_rows, evalset.size, train.batch_size)
    contrib = contribution_matrix(
        rm, params, train, evalset, params_spec=params_spec, lr=lr, mode=mode, project=project, seed=seed,
        block=block, memory_budget_gb=memory_budget_gb, mesh=mesh, progress=progress, objective=objective,
    )  # fmt: skip
    rm, params, spec = prepare(reward_model(rm, objective), params, params_spec)
    is_im = isinstance(rm, ImplicitRM)
    beta = rm.beta if is_im else 1.0
    states = item_states(rm.lm, params["lm"], train, evalset)
    scores = overlap_scores(rm.lm, params["lm"], train, evalset, beta=beta, states=states)
    # Eq. (5)'s indicator term is a part of C only when the unembedding trains (not, e.g., under `lora`)
    stats = overlap_statistics(contrib.contribution, scores, contrib.weight, lr,
                               implicit=is_im and _trains_unembedding(rm, params, spec))  # fmt: skip
    stats["source"] = None if train_rows is None else source_ranks(contrib.contribution, train_rows)
    rankings = []
    for i in range(evalset.size):
        up, down = contrib.top(i, top)
        rankings.append({"up": up, "down": down})
    views: dict[str, TokenPairView] = {}
    # the token-pair terms (docs/math.md §10.6) are those of the summed log-probability: SimPO's 1/|y| is not in them
    stats["token_view"] = "not computed: length-normalised reward" if getattr(rm, "length_normalised", False) else None
    if is_im and token_entries > 0 and stats["token_view"] is None:
        views = _token_views(rm.lm, params["lm"], states, contrib, lr, beta, top, token_entries)
    return Attribution(contrib, scores, stats, rankings, views)


def _trains_unembedding(rm, params, spec: str) -> bool:
    """Whether the selection trains the LM head W (or the tied input embedding, which is W)."""
    import jax

    from dynamics.masks import trainable_mask

    mask = trainable_mask(rm, params, spec)
    paths = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(mask) if v]
    return any("'lm_head'" in p or ("'embed'" in p and rm.lm.config.tie_embeddings) for p in paths)


def _check_train_rows(train_rows: Sequence[int | None], n_eval: int, n_train: int) -> None:
    from dynamics.errors import ConfigError

    if len(train_rows) != n_eval:
        raise ConfigError(f"train_rows has {len(train_rows)} entries for {n_eval} eval items")
    for i, s in enumerate(train_rows):
        if s is not None and not 0 <= s < n_train:
            raise ConfigError(f"eval item {i}: train_row {s} is not a training pair (0..{n_train - 1})")


def _token_views(lm, lm_params, states: ItemStates, contrib, lr, beta, top, n_entries) -> dict[str, TokenPairView]:
    views = {}
    for i, j in largest_entries(contrib.contribution, n_entries):
        scale = lr * float(contrib.weight[j]) * beta**2
        views[f"{i},{j}"] = token_pairs(lm, lm_params, states.eval, states.train, i, j, scale=scale, n=top)
    return views
