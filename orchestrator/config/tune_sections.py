"""The tune section of a job file (``orchestrator sweep``): the search space, the searcher and the trial
schedulers (ASHA, PBT, median stopping, plateau), each in a pydantic model of its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator
from typing_extensions import TypeAliasType

from orchestrator.config.distributions import parse_expression, parse_search_space
from orchestrator.config.sections import _Section


def _check_search_expression(value: Any) -> Any:
    """Accept a search-space expression as it is written, once it parses (see ``parse_expression``)."""
    parse_expression(value)  # raises ValueError saying what is wrong
    return value


# A search-space value: an expression such as 'loguniform(1e-5, 1e-3)' (see orchestrator.config.distributions).
SearchExpression = TypeAliasType(
    "SearchExpression",
    Annotated[
        Any,
        AfterValidator(_check_search_expression),
        WithJsonSchema({"type": "string", "examples": ["loguniform(1e-5, 1e-3)", "choice([none, gradual])"]}),
    ],
)


class AshaSection(_Section):
    grace_period: int = Field(
        1,
        gt=0,
        description="Eval intervals every trial runs before ASHA may stop it (one interval = "
        "training.eval_every_steps optimizer steps).",
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="At each rung only the top 1/reduction_factor of trials go on."
    )
    max_t: int | None = Field(
        None, gt=0, description="Eval intervals of the longest trial (null: those of a full run of the job)."
    )


class PbtSection(_Section):
    perturbation_interval: int = Field(
        2,
        gt=0,
        description="Eval intervals between PBT decisions: the bottom trials copy a top trial's "
        "checkpoint and continue with mutated hyperparameters.",
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="Fraction of trials in the top (donors) and bottom (exploiters) groups."
    )
    resample_probability: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Chance that a mutated value is drawn anew from the search space "
        "(otherwise it is perturbed by x0.8 / x1.2 or moved to a neighbouring choice).",
    )


class MedianStopSection(_Section):
    grace_period: int = Field(1, gt=0, description="Eval intervals before a trial may be stopped.")
    min_samples_required: int = Field(
        3, gt=0, description="Trials that must have reached an interval before it is used to compare."
    )


class PlateauSection(_Section):
    std: float = Field(
        0.001, ge=0, description="Stop a trial when the std of its last num_results metric values is below this."
    )
    num_results: int = Field(3, gt=1, description="How many of the latest eval results are compared.")
    grace_period: int = Field(3, gt=0, description="Eval intervals before a trial may be stopped for a plateau.")


class TuneSection(_Section):
    """A hyperparameter sweep (``orchestrator sweep``): every trial is the whole job with sampled values."""

    metric: str = Field(
        "auto",
        description="Metric to optimise, '<eval set>/<metric>' (e.g. sst2/accuracy) or 'auto' (training.metric's "
        "choice: accuracy of the first eval set, or its loss for causal-lm).",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether larger ('max') or smaller ('min') is better; 'auto' from the metric name."
    )
    search_space: dict[str, SearchExpression] = Field(
        min_length=1,
        description="Config field (dotted path) -> distribution: uniform(a, b), quniform(a, b, q), loguniform(a, b), "
        "qloguniform(a, b, q), randn(mean, sd), qrandn(mean, sd, q), randint(a, b) (b excluded), qrandint(a, b, q), "
        "lograndint(a, b), qlograndint(a, b, q), choice([x, y, ...]) or grid([x, y, ...]) (every value, "
        "x num_samples). E.g. {training.lr: 'loguniform(1e-5, 1e-3)', unfreeze.kind: 'choice([none, gradual])'}.",
    )
    num_samples: int = Field(
        4, gt=0, description="Trials drawn from the search space (with grid values: repeats of the whole grid)."
    )
    searcher: Literal["random", "optuna"] = Field(
        "random",
        description="random: random draws (and every grid value); optuna: Optuna TPE (pip install "
        "'orchestrator[tune]'), no grid values.",
    )
    scheduler: Literal["asha", "pbt", "median", "none"] = Field(
        "asha",
        description="asha: stop trials that trail at each rung; pbt: population-based training; median: stop "
        "trials below the median of others at the same point; none: run every trial to the end (FIFO).",
    )
    asha: AshaSection = Field(default_factory=AshaSection, description="ASHA settings (scheduler: asha).")
    pbt: PbtSection = Field(
        default_factory=PbtSection,
        description="PBT settings (scheduler: pbt). Trials hand their checkpoints to Tune, which keeps them in "
        "<sweep dir>/tune for other trials to exploit.",
    )
    median: MedianStopSection = Field(
        default_factory=MedianStopSection, description="Median stopping settings (scheduler: median)."
    )
    plateau: PlateauSection | None = Field(
        None, description="Also stop a trial whose metric stopped moving (null: off)."
    )
    stop_on_nan: bool = Field(True, description="Stop a trial as soon as its metric is NaN or infinite.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials running at once (null: as many as the cluster holds whole; never more)."
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop the sweep after this many seconds; running trials are stopped."
    )
    driver_memory_mb: int = Field(
        512, gt=0, description="Memory reserved for each trial's driver (it reserves no CPU; the workers do)."
    )
    seed: int | None = Field(None, ge=0, description="Seed of the searcher's draws (null: random).")
    export_best: bool = Field(True, description="Copy the best trial's best model to <sweep dir>/best_model.")

    @model_validator(mode="after")
    def _searcher_fits(self) -> TuneSection:
        space = parse_search_space(self.search_space)
        grid = sorted(path for path, dist in space.items() if dist.is_grid)
        problems = []
        if grid and self.searcher == "optuna":
            problems.append(f"searcher optuna cannot take grid values ({', '.join(grid)}); use choice([...])")
        if self.scheduler == "pbt":
            if self.searcher != "random":
                problems.append("scheduler pbt draws and mutates values itself; set searcher: random")
            if grid:
                problems.append(f"scheduler pbt cannot mutate grid values ({', '.join(grid)}); use choice([...])")
        if problems:
            raise ValueError("; ".join(problems))
        return self

