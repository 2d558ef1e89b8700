"""Which cached samples the evaluation loss reads, and under which names its values are logged.

As SimpleTuner: with datasets of `dataset_type: eval` in the cache (never trained on), the evaluation loss reads
those, `num_eval_images` samples of each (SimpleTuner caps each dataset's pass at it), or of all of them together
with `eval_dataset_pooling` (the datasets one after the other, as SimpleTuner's pooled pass draws them).
`eval_dataset_id` (one id or a list) picks some of them. Values: `eval_loss/<dataset id>` per dataset, and
`eval_loss` over every sample evaluated (the only value when pooled). Without eval datasets st keeps its own
evaluation, where SimpleTuner has none: the first `num_eval_images` cached samples (by content id).

Each sample is evaluated at `eval_timesteps` points of the noise schedule (`eval_fractions`), with noise seeded by its
position. DEVIATION: SimpleTuner evaluates at the training scheduler's `set_timesteps(eval_timesteps)` schedule
(shifted, for flow matching); st at the midpoints of eval_timesteps equal parts of the unshifted schedule, the
same points for every family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..log import get_logger
from .options import EvaluationOptions

log = get_logger("train")

EVAL_TYPE = "eval"
OVERALL = "eval_loss"


def eval_datasets(datasets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ids of the eval datasets, in the dataset list's order."""
    return [i for i, d in datasets.items() if d.get("dataset_type") == EVAL_TYPE]


def chosen_datasets(datasets: Mapping[str, Mapping[str, Any]], options: EvaluationOptions) -> list[str]:
    """The eval datasets the evaluation reads: those eval_dataset_id names, else all of them."""
    available = eval_datasets(datasets)
    asked = options.dataset_ids()
    if not asked:
        return available
    for dataset_id in asked:
        if dataset_id not in available:
            listed = ", ".join(available) if available else "none"
            raise ConfigError(
                f"eval_dataset_id names '{dataset_id}', which is not an eval dataset of this cache (eval datasets: "
                f"{listed}); mark it `dataset_type: eval` in the dataset list and re-run `st prepare` and "
                "`st cache`, or set eval_dataset_id to one of them"
            )
    return asked


def sample_sets(samples: Mapping[str, Any], datasets: Mapping[str, Mapping[str, Any]],
                options: EvaluationOptions) -> dict[str, list[str]]:  # fmt: skip
    """Value name -> the sample keys it averages over. `samples`: key -> a reference with `dataset_id`."""
    count = options.num_eval_images
    chosen = chosen_datasets(datasets, options)
    if not chosen:
        return {OVERALL: sorted(samples)[:count]}
    keys = {d: sorted(k for k, ref in samples.items() if ref.dataset_id == d) for d in chosen}
    for dataset_id in (d for d in chosen if not keys[d]):
        log.warning("eval dataset '%s' has no cached samples; the evaluation loss leaves it out", dataset_id)
    if options.eval_dataset_pooling:
        return {OVERALL: [k for d in chosen for k in keys[d]][:count]}
    return {f"{OVERALL}/{d}": keys[d][:count] for d in chosen if keys[d]}


def eval_fractions(count: int) -> tuple[float, ...]:
    """The schedule fractions (0: clean, 1: pure noise) the evaluation reads each sample at: the midpoints of `count`
    equal parts (count 5: 0.1, 0.3, 0.5, 0.7, 0.9)."""
    return tuple((i + 0.5) / count for i in range(count))


def summarise(losses: Mapping[str, list[float]]) -> dict[str, float]:
    """Each value's mean, and `eval_loss` over every loss (the mean of all samples, not of the datasets' means)."""
    values = {name: sum(found) / len(found) for name, found in losses.items() if found}
    every = [loss for found in losses.values() for loss in found]
    if every:
        values[OVERALL] = sum(every) / len(every)
    return values
