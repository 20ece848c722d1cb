"""Search spaces of sweeps: every distribution parses into its Ray Tune domain, bad expressions and unknown or
invalid fields are clear errors naming ``tune.search_space.<path>``, and sweep checks report everything at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from orchestrator.config import config_from_dict, load_config
from orchestrator.config.search_space import check_search_space, parse_expression, parse_search_space
from orchestrator.errors import ConfigError
from orchestrator.tune.sweep_events import MetricStopper
from orchestrator.tune.sweep_plan import plan_sweep
from orchestrator.tune.sweep_results import TrialRecord, best_trial, error_text, plot_learning_curves
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("text", "kind", "args", "candidates", "domain"),
    [
        ("uniform(0.6, 1.0)", "uniform", (0.6, 1.0), [0.6, 1.0], tune.search.sample.Float),
        ("quniform(0, 1, 0.25)", "quniform", (0.0, 1.0, 0.25), [0.0, 1.0], tune.search.sample.Float),
        ("loguniform(1e-5, 1e-3)", "loguniform", (1e-5, 1e-3), [1e-5, 1e-3], tune.search.sample.Float),
        ("qloguniform(1e-4, 1e-1, 5e-5)", "qloguniform", (1e-4, 1e-1, 5e-5), [1e-4, 1e-1], tune.search.sample.Float),
        ("randn(0, 1)", "randn", (0.0, 1.0), [0.0], tune.search.sample.Float),
        ("qrandn(0, 1, 0.1)", "qrandn", (0.0, 1.0, 0.1), [0.0], tune.search.sample.Float),
        ("randint(1, 4)", "randint", (1, 4), [1, 3], tune.search.sample.Integer),  # 4 is excluded
        ("qrandint(2, 8, 2)", "qrandint", (2, 8, 2), [2, 8], tune.search.sample.Integer),
        ("lograndint(1, 100)", "lograndint", (1, 100), [1, 99], tune.search.sample.Integer),
        ("qlograndint(1, 64, 1)", "qlograndint", (1, 64, 1), [1, 64], tune.search.sample.Integer),
        ("choice([none, gradual])", "choice", ("none", "gradual"), ["none", "gradual"], tune.search.sample.Categorical),
        ("choice(none, gradual)", "choice", ("none", "gradual"), ["none", "gradual"], tune.search.sample.Categorical),
        ("choice([1, 2])", "choice", (1, 2), [1, 2], tune.search.sample.Categorical),
        ("grid([1e-4, 3e-4])", "grid", (1e-4, 3e-4), [1e-4, 3e-4], dict),
        ("  loguniform( 1.0e-5 ,1e-3 ) ", "loguniform", (1e-5, 1e-3), [1e-5, 1e-3], tune.search.sample.Float),
    ],
)
def test_every_distribution_parses_to_its_tune_domain(text, kind, args, candidates, domain):
    dist = parse_expression(text)
    assert dist.kind == kind
    assert dist.args == pytest.approx(args) if kind not in ("choice", "grid") else dist.args == args
    assert (
        dist.candidates() == pytest.approx(candidates) if kind not in ("choice",) else dist.candidates() == candidates
    )
    assert isinstance(dist.to_tune(), domain)
    if kind == "grid":
        assert dist.to_tune() == {"grid_search": list(args)}


def test_yaml_1_1_exponent_numbers_are_numbers_not_strings():
    # PyYAML reads "1e-5" as a string; a learning rate must still be a float.
    assert parse_expression("choice([1e-5, 3e-4, 0.1])").args == (1e-5, 3e-4, 0.1)
    args = parse_expression("choice([1e-5, 3e-4])").args
    assert len(args) == 2 and all(isinstance(v, float) for v in args)  # all() of no args would pass
    assert parse_expression("choice([true, null, '1e-5'])").args == (True, None, 1e-5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("logunifrom(1e-5, 1e-3)", "unknown distribution 'logunifrom'; did you mean 'loguniform'?"),
        ("normal(0, 1)", "unknown distribution 'normal'"),
        ("loguniform(1e-5)", "loguniform takes 2 arguments (low, high), got 1"),
        ("uniform(1, 0)", "low must be smaller than high"),
        ("loguniform(0, 1)", "low must be > 0"),
        ("uniform(a, b)", "low must be a finite number, got 'a'"),
        ("uniform(0, .inf)", "high must be a finite number"),
        ("randint(1.5, 3)", "low must be an integer"),
        ("randint(2, 3.0)", None),  # 3.0 is an integer value: fine
        ("randint(2, 2)", "low must be smaller than high"),
        ("quniform(0, 1, 0)", "q must be > 0"),
        ("randn(0, -1)", "sd must be > 0"),
        ("choice([])", "needs at least one value"),
        ("choice([a, a])", "lists a value twice"),
        ("choice([a, b]", "is not of the form name(arguments)"),
        ("choice([a, {b: 1}])", "values must be plain values"),
        ("uniform(0, [1)", "are not valid YAML"),
        ("import os", "is not of the form name(arguments)"),
        ("__import__('os').system('true')", "unknown distribution '__import__'"),
        (0.001, "got 0.001 (a fixed value belongs in the job's own section)"),
        ([1, 2], "for a list of values write 'choice([1, 2])'"),
    ],
)
def test_bad_expressions_say_what_is_wrong(value, message):
    if message is None:
        parse_expression(value)
        return
    with pytest.raises(ValueError) as excinfo:
        parse_expression(value)
    assert message in str(excinfo.value)


def _job(tmp_path: Path, **tune_section) -> dict:
    return {
        "name": "sweep",
        "model": {"path": str(tmp_path / "model")},
        "data": {"train": {"path": str(tmp_path / "train.tsv")}},
        "output": {"dir": str(tmp_path / "out")},
        "tune": {"search_space": {"training.lr": "loguniform(1e-5, 1e-3)"}, **tune_section},
    }


def test_tune_section_errors_name_the_search_space_path_and_come_all_at_once(tmp_path):
    job = _job(tmp_path)
    job["tune"]["search_space"] = {
        "training.lr": "logunifrom(1e-5, 1e-3)",
        "unfreeze.kind": ["none", "gradual"],
        "training.warmup_steps": "randint(0, 10)",
    }
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(job)
    locations = [issue.location for issue in excinfo.value.issues]
    assert locations == ["tune.search_space.training.lr", "tune.search_space.unfreeze.kind"]
    assert "did you mean 'loguniform'" in str(excinfo.value)


def test_searcher_and_scheduler_combinations_are_checked(tmp_path):
    job = _job(tmp_path, searcher="optuna")
    job["tune"]["search_space"] = {"training.lr": "grid([1e-4, 2e-4])"}
    with pytest.raises(ConfigError, match="searcher optuna cannot take grid values"):
        config_from_dict(job)
    job = _job(tmp_path, searcher="optuna", scheduler="pbt")
    with pytest.raises(ConfigError, match="set searcher: random"):
        config_from_dict(job)
    with pytest.raises(ConfigError, match="tune.asha.reduction_factor"):
        config_from_dict(_job(tmp_path, asha={"reduction_factor": 1}))
    with pytest.raises(ConfigError, match="tune.search_space"):
        config_from_dict(_job(tmp_path, search_space={}))
    assert config_from_dict(_job(tmp_path)).tune.scheduler == "asha"  # the default


def _base(tmp_path: Path) -> dict:
    job = _job(tmp_path)
    del job["tune"]
    return job


def test_unknown_fields_and_refused_values_are_errors_at_their_path(tmp_path):
    space = parse_search_space(
        {
            "training.lrr": "loguniform(1e-5, 1e-3)",  # typo
            "trainig.lr": "loguniform(1e-5, 1e-3)",  # typo in the section
            "training.warmup_ratio": "uniform(0.5, 1.0)",  # 1.0 is refused (< 1)
            "unfreeze.kind": "choice([none, gradual, sideways])",
            "deepspeed.stage": "choice([0, 2, 4])",
            "data.eval.3.path": "choice([a.tsv])",  # no such list item
            "output.dir": "choice([a, b])",  # set by the sweep
            "training.lr": "loguniform(1e-5, 1e-3)",  # fine
        }
    )
    issues = {issue.location: issue for issue in check_search_space(_base(tmp_path), space)}
    assert sorted(issues) == [
        "tune.search_space.data.eval.3.path",
        "tune.search_space.deepspeed.stage",
        "tune.search_space.output.dir",
        "tune.search_space.trainig.lr",
        "tune.search_space.training.lrr",
        "tune.search_space.training.warmup_ratio",
        "tune.search_space.unfreeze.kind",
    ]
    assert issues["tune.search_space.training.lrr"].message == "unknown key 'lrr'"
    assert "did you mean 'lr'" in issues["tune.search_space.training.lrr"].hint
    assert "did you mean 'training'" in issues["tune.search_space.trainig.lr"].hint
    assert issues["tune.search_space.training.warmup_ratio"].message.startswith("value 1.0: ")
    assert "'sideways'" in issues["tune.search_space.unfreeze.kind"].message
    assert "value 4" in issues["tune.search_space.deepspeed.stage"].message
    assert "cannot be searched" in issues["tune.search_space.output.dir"].message


def test_cross_field_rules_see_the_combinations_trials_will_see(tmp_path):
    base = _base(tmp_path)
    # gradual needs every_steps: fine when every_steps is searched too ...
    together = parse_search_space(
        {"unfreeze.kind": "choice([none, gradual])", "unfreeze.every_steps": "choice([1, 2])"}
    )
    assert check_search_space(base, together) == []
    # ... but an error, at unfreeze.kind, when nothing sets it.
    alone = parse_search_space({"unfreeze.kind": "choice([none, gradual])"})
    (issue,) = check_search_space(base, alone)
    assert issue.location == "tune.search_space.unfreeze.kind"
    assert "value 'gradual'" in issue.message and "every_steps" in issue.message


def test_plan_sweep_reports_every_problem_at_once(tmp_path):
    job = _job(tmp_path, metric="dev/accuracy", asha={"grace_period": 9})
    job["tune"]["search_space"] = {"training.lrr": "loguniform(1e-5, 1e-3)"}
    with pytest.raises(ConfigError) as excinfo:
        plan_sweep(config_from_dict(job))
    locations = {issue.location for issue in excinfo.value.issues}
    # the typo, the missing model and data, and eval_every_steps for ASHA, all in one error
    assert {"tune.search_space.training.lrr", "model.path", "data", "training.eval_every_steps"} <= locations


def test_plan_sweep_resolves_metric_and_asha_budget(tmp_path, tiny_models, shared_data):
    from tests.conftest import tiny_job

    job = tiny_job("plan", tiny_models["bert"], shared_data, tmp_path, max_steps=10, eval_every_steps=2)
    job["tune"] = {"search_space": {"training.max_steps": "choice([10, 14])"}}
    plan = plan_sweep(config_from_dict(job))
    assert (plan.metric, plan.mode) == ("sst2/accuracy", "max")
    assert plan.evals_per_trial == 7  # the longest trial: 14 steps, eval every 2
    assert Path(plan.base["data"]["train"]["path"]).is_absolute()
    assert "tune" not in plan.base

    job["tune"] = {"metric": "sst2/bleu", "search_space": {"training.lr": "uniform(1e-4, 1e-3)"}}
    with pytest.raises(ConfigError, match="'sst2/bleu' is not a reported metric"):
        plan_sweep(config_from_dict(job))
    job["tune"] = {"metric": "sst2/loss", "search_space": {"training.lr": "uniform(1e-4, 1e-3)"}}
    assert plan_sweep(config_from_dict(job)).mode == "min"


def test_shipped_sweep_config_is_valid_against_the_job(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(shared_data))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path))
    config = load_config(REPO / "configs" / "sweep_lr_unfreeze.yaml")
    plan = plan_sweep(config)
    assert set(plan.space) == {"training.lr", "unfreeze.kind", "unfreeze.every_steps", "unfreeze.lr_decay"}
    assert plan.evals_per_trial == 5


def test_metric_stopper_stops_on_nan_and_plateau(tmp_path):
    stopper = MetricStopper(
        metric="m",
        mode="max",
        stop_on_nan=True,
        plateau={"std": 0.01, "num_results": 3, "grace_period": 3},
        sweep_dir=str(tmp_path),
    )
    assert not stopper("a", {"m": 0.5, "training_iteration": 1})
    assert stopper("a", {"m": float("nan"), "training_iteration": 2})
    assert not stopper("b", {"training_iteration": 1})  # a result without the metric: not judged here
    results = [stopper("c", {"m": 0.7, "training_iteration": i}) for i in range(1, 5)]
    assert results[-1] is True and not any(results[:2])
    reasons = (tmp_path / "trial_events.jsonl").read_text()
    assert '"trial_id": "a", "reason": "nan"' in reasons and '"trial_id": "c", "reason": "plateau"' in reasons


def test_best_trial_ignores_failed_trials_and_follows_the_mode():
    def record(tid, status, best):
        return TrialRecord(trial_id=tid, status=status, params={}, best_metric=best, last_metric=best, steps=1)

    trials = [record("a", "completed", 0.6), record("b", "early_stopped", 0.7), record("c", "error", 0.9)]
    assert best_trial(trials, "max").trial_id == "b"
    assert best_trial(trials, "min").trial_id == "a"
    assert best_trial([record("c", "error", 0.9)], "max") is None


def test_learning_curve_plot_shows_stopped_trials(tmp_path):
    trials = [
        TrialRecord("a", "completed", {}, 0.8, 0.8, 6, history=[(2, 0.5), (4, 0.7), (6, 0.8)]),
        TrialRecord("b", "early_stopped", {}, 0.4, 0.4, 2, stop_reason="asha", history=[(2, 0.4)]),
        TrialRecord("c", "error", {}, None, None, None, error="TrainingError: loss became nan"),
    ]
    path = plot_learning_curves(trials, "sst2/accuracy", "a", tmp_path)
    assert path is not None and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_learning_curves(trials[2:], "m", None, tmp_path / "none") is None


def test_error_text_finds_the_root_cause():
    wrapped = RuntimeError("Training failed\n...\norchestrator.errors.TrainingError: loss became nan at step 3\n  more")
    assert error_text(wrapped) == "TrainingError: loss became nan at step 3"
    assert error_text(KeyError("x")) == "KeyError: 'x'"


def test_sweep_command_prints_every_problem_and_starts_nothing(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    bad = tmp_path / "sweep.yaml"
    bad.write_text(
        "name: bad-sweep\n"
        f"model: {{path: {tmp_path / 'model'}}}\n"
        f"data: {{train: {{path: {tmp_path / 'train.tsv'}}}}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n"
        "tune:\n"
        "  search_space:\n"
        "    training.lrr: loguniform(1e-5, 1e-3)\n"
        "    unfreeze.lr_decay: uniform(0.6, 1.5)\n"
    )
    result = CliRunner().invoke(app, ["sweep", str(bad)])
    assert result.exit_code == 2
    assert "tune.search_space.training.lrr: unknown key 'lrr'" in result.output
    assert "tune.search_space.unfreeze.lr_decay: value 1.5" in result.output
    assert "model.path" in result.output  # the model is checked in the same pass
    assert not (tmp_path / "runs" / "bad-sweep" / "tune").exists()  # no sweep was started

    both = CliRunner().invoke(app, ["sweep", str(bad), "--resume", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output
    missing = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert missing.exit_code == 2 and "is not a sweep folder" in missing.output


def test_config_error_survives_pickling_as_ray_sends_trial_errors():
    import pickle

    from orchestrator.errors import ConfigIssue

    error = ConfigError([ConfigIssue("model.path", "model folder not found", hint="check it")], source="job.yaml")
    again = pickle.loads(pickle.dumps(error))
    assert again.issues == error.issues and str(again) == str(error)
    assert error_text(RuntimeError(f"wrapped\norchestrator.errors.ConfigError: {error}\nTraceback")) == (
        "ConfigError: 1 problem in job.yaml: - job.yaml: model.path: model folder not found fix: check it"
    )


def test_sweep_command_prints_the_results_table(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import orchestrator.tune.sweep
    from orchestrator.cli import app
    from orchestrator.tune.sweep_results import SweepResult

    trials = [
        TrialRecord("a_00000", "completed", {"training.lr": 1e-3}, 0.81, 0.8, 8),
        TrialRecord("a_00001", "early_stopped", {"training.lr": 0.3}, 0.5, 0.5, 3, stop_reason="asha"),
        TrialRecord("a_00002", "error", {"training.lr": 0.5}, None, None, None, error="TrainingError: loss became nan"),
    ]
    fake = SweepResult(
        sweep_dir=tmp_path / "s",
        metric="sst2/accuracy",
        mode="max",
        trials=trials,
        best=trials[0],
        best_model=tmp_path / "s" / "best_model",
        results_csv=tmp_path / "s" / "results.csv",
        results_json=tmp_path / "s" / "results.json",
        plot=tmp_path / "s" / "learning_curves.png",
        wandb=None,
    )
    monkeypatch.setattr(orchestrator.tune.sweep, "resume_sweep", lambda sweep_dir, address=None: fake)
    result = CliRunner().invoke(app, ["sweep", "--resume", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("a_00001", "early stopped", "stopped: asha", "TrainingError: loss became nan", "0.8100"):
        assert text in result.output
    assert "best trial a_00000: sst2/accuracy 0.8100" in result.output


@pytest.mark.parametrize("searcher", ["random", "optuna"])
def test_at_most_the_allowed_trials_run_at_once_with_a_seeded_or_optuna_searcher(
    searcher, tmp_path, tiny_models, shared_data
):
    """A seeded random search passes its own generator to Tune, which then ignores max_concurrent_trials: the
    generator itself must carry the limit (else every trial starts at once and their drivers pile up)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from orchestrator.tune.sweep import _new_tuner
    from tests.conftest import tiny_job

    job = tiny_job("conc", tiny_models["bert"], shared_data, tmp_path, max_steps=4, eval_every_steps=2)
    job["tune"] = {"search_space": {"training.lr": "uniform(1e-4, 1e-3)"}, "num_samples": 6, "seed": 0,
                   "searcher": searcher}
    plan = plan_sweep(config_from_dict(job))

    tuner = _new_tuner(plan, lambda config: None, 2, verbose=False)

    search_alg = tuner._local_tuner._tune_config.search_alg
    if searcher == "random":
        assert isinstance(search_alg, BasicVariantGenerator) and search_alg.max_concurrent == 2
    else:
        assert tuner._local_tuner._tune_config.max_concurrent_trials == 2
        assert not isinstance(search_alg, ConcurrencyLimiter)  # Tune wraps a Searcher itself
