"""Bad input is refused before the job takes any cluster resources (issue 7).

One case per kind of mistake a user makes: in the job file, in the data, in the model folder, in a sweep or
retraining file, in the output location. Each is checked through the entry point that meets it first
(``load_config``, ``preflight``, ``plan_sweep``, ``load_retrain``) and again through ``orchestrator validate``
when the mistake lives in a file, with ``ray.init`` made to fail: no case may get as far as starting Ray. Every
message must say where the problem is (field, file or line) and what to do about it.

The one check that needs a cluster (more workers than it can ever hold) runs against a small local Ray
instance and must fail at once instead of waiting for resources that never come.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.cluster.launcher import run_training
from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict, load_config
from orchestrator.config.retrain import load_retrain
from orchestrator.errors import OrchestratorError
from orchestrator.tune.sweep_plan import plan_sweep

GOOD_ROWS = "sentence\tlabel\na gripping film\tpos\ndull and far too long\tneg\nfine\tpos\nno\tneg\n"


@dataclass
class Bad:
    """A bad input: how the product meets it, and what its error must contain."""

    check: Callable[[], Any]  # raises the error
    where: list[str]  # the field, file or line it must name
    fix: list[str]  # words of what to do
    config_file: Path  # the file `orchestrator validate` is given
    extra_cli_args: list[str] = field(default_factory=list)


class Workspace:
    """A valid job (tiny model, small data file) in a temp folder, for each case to break one thing of."""

    def __init__(self, root: Path, model: Path):
        self.root = root
        self.model = model
        self.train = self.file("train.tsv", GOOD_ROWS)

    def file(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def job(self) -> dict[str, Any]:
        return {
            "name": "bad-input",
            "model": {"path": str(self.model)},
            "data": {"train": {"path": str(self.train), "text_column": "sentence"}},
            "training": {"max_steps": 2, "batch_size_per_worker": 2},
            "tracking": {"wandb": {"mode": "disabled"}},
            "output": {"dir": str(self.root / "runs")},
        }

    def write(self, data: dict[str, Any], name: str = "job.yaml") -> Path:
        return self.file(name, yaml.safe_dump(data, sort_keys=False))

    def write_text(self, text: str, name: str = "job.yaml") -> Path:
        return self.file(name, text)

    @staticmethod
    def line_of(path: Path, text: str) -> int:
        """The 1-based line of the first line of ``path`` that contains ``text``."""
        lines = path.read_text().splitlines()
        return next(i for i, line in enumerate(lines, 1) if text in line)

    def preflighted(self, data: dict[str, Any], name: str = "job.yaml") -> tuple[Path, Callable[[], Any]]:
        """The job written to a file, and a check that loads and preflights it (what `train` does first)."""
        path = self.write(data, name)
        return path, lambda: preflight(load_config(path), source=str(path))


# --------------------------------------------------------------------------------------------------
# The cases: each breaks one thing of a valid job
# --------------------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Workspace], Bad]] = {}


def case(build: Callable[[Workspace], Bad]) -> Callable[[Workspace], Bad]:
    CASES[build.__name__] = build
    return build


@case
def unknown_config_key(ws: Workspace) -> Bad:
    job = ws.job()
    job["trainig"] = job.pop("training")
    path = ws.write(job)
    line = ws.line_of(path, "trainig:")
    return Bad(
        lambda: load_config(path),
        where=[f"{path}:{line}:", "unknown key 'trainig'"],
        fix=["did you mean 'training'?"],
        config_file=path,
    )


@case
def wrong_type(ws: Workspace) -> Bad:
    job = ws.job()
    job["training"]["lr"] = "fast"
    path = ws.write(job)
    line = ws.line_of(path, "lr: fast")
    return Bad(
        lambda: load_config(path),
        where=[f"{path}:{line}: training.lr", "(got 'fast')"],
        fix=["valid number", "give a valid value here"],
        config_file=path,
    )


@case
def zero_stage_4(ws: Workspace) -> Bad:
    job = ws.job()
    job["deepspeed"] = {"stage": 4}
    path = ws.write(job)
    line = ws.line_of(path, "stage: 4")
    return Bad(
        lambda: load_config(path),
        where=[f"{path}:{line}: deepspeed.stage", "(got 4)"],
        fix=["0, 1, 2 or 3"],
        config_file=path,
    )


@case
def batch_size_zero(ws: Workspace) -> Bad:
    job = ws.job()
    job["training"]["batch_size_per_worker"] = 0
    path = ws.write(job)
    line = ws.line_of(path, "batch_size_per_worker: 0")
    return Bad(
        lambda: load_config(path),
        where=[f"{path}:{line}: training.batch_size_per_worker", "(got 0)"],
        fix=["greater than 0", "give a valid value here"],
        config_file=path,
    )


@case
def missing_data_file(ws: Workspace) -> Bad:
    job = ws.job()
    missing = ws.root / "no-such-dir" / "train.tsv"
    job["data"]["train"]["path"] = str(missing)
    path, check = ws.preflighted(job)
    return Bad(check, where=[f"{missing}: data file not found"], fix=["check data.*.path"], config_file=path)


@case
def empty_data_file(ws: Workspace) -> Bad:
    job = ws.job()
    empty = ws.file("empty.tsv", "")
    job["data"]["train"]["path"] = str(empty)
    path, check = ws.preflighted(job)
    return Bad(
        check, where=[f"{empty}: the file is empty"], fix=["point data.*.path at a file with rows"], config_file=path
    )


@case
def wrong_delimiter(ws: Workspace) -> Bad:
    job = ws.job()
    commas = ws.file("commas.tsv", GOOD_ROWS.replace("\t", ","))
    job["data"]["train"]["path"] = str(commas)
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=[f"{commas}: line 1", "text_column 'sentence'", "the header has 'sentence,label'"],
        fix=["wrong delimiter", "tab-separated"],
        config_file=path,
    )


@case
def missing_column(ws: Workspace) -> Bad:
    job = ws.job()
    job["data"]["train"]["text_column"] = "review"
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=[f"{ws.train}: line 1", "text_column 'review' is not a column"],
        fix=["'sentence', 'label'", "Set text_column to one of them"],
        config_file=path,
    )


@case
def label_not_in_the_label_set(ws: Workspace) -> Bad:
    job = ws.job()
    odd = ws.file("odd-label.tsv", "sentence\tlabel\ngood\tpos\nhm\tmaybe\nbad\tneg\n")
    job["data"]["train"]["path"] = str(odd)
    job["data"]["label_names"] = ["neg", "pos"]
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=[f"{odd}:3: label 'maybe' is not in the label set (neg, pos)"],
        fix=["fix the row", "data.on_bad_rows: skip"],
        config_file=path,
    )


@case
def empty_text_value(ws: Workspace) -> Bad:
    job = ws.job()
    blank = ws.file("blank-text.tsv", "sentence\tlabel\ngood\tpos\n   \tneg\nbad\tneg\n")
    job["data"]["train"]["path"] = str(blank)
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=[f"{blank}:3: empty text in column 'sentence'"],
        fix=["fix the row", "data.on_bad_rows: skip"],
        config_file=path,
    )


@case
def model_path_missing(ws: Workspace) -> Bad:
    job = ws.job()
    job["model"]["path"] = str(ws.root / "no-such-model")
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["model.path", f"{ws.root / 'no-such-model'}' does not exist"],
        fix=["a local folder, the alias 'minilm', or a hub id: name or org/name"],
        config_file=path,
    )


@case
def max_length_beyond_the_models_positions(ws: Workspace) -> Bad:
    job = ws.job()
    job["data"]["max_length"] = 100000  # the tiny BERT embeds 256 positions (max_position_embeddings)
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["data.max_length", "100000 tokens per row", "has positions for 256 (max_position_embeddings"],
        fix=["set data.max_length to 256 or less"],
        config_file=path,
    )


@case
def model_path_neither_a_folder_nor_a_hub_id(ws: Workspace) -> Bad:
    job = ws.job()
    job["model"]["path"] = "runs/old-run/final"  # relative, missing, and two slashes: no hub id either
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["model.path", "'runs/old-run/final' is not a local folder", "nor a valid Hugging Face Hub id"],
        fix=["give a model folder, the alias 'minilm', or a hub id such as 'gpt2' or 'org/name'"],
        config_file=path,
    )


@case
def model_path_not_a_model_folder(ws: Workspace) -> Bad:
    job = ws.job()
    folder = ws.root / "just-a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("weights are elsewhere")
    job["model"]["path"] = str(folder)
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["model.path", "is not a Hugging Face model folder (no config.json)"],
        fix=["point it at the folder that save_pretrained wrote"],
        config_file=path,
    )


@case
def lora_target_module_matching_nothing(ws: Workspace) -> Bad:
    job = ws.job()
    job["method"] = "lora"
    job["lora"] = {"target_modules": ["q_proj"]}  # a Llama name; the model is a BERT
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["lora.target_modules", "['q_proj'] match no module of BertForSequenceClassification"],
        fix=["its module names are:", "query", "value", "set lora.target_modules to linear layers"],
        config_file=path,
    )


@case
def teacher_and_student_vocabularies_differ(ws: Workspace) -> Bad:
    from orchestrator.models.loading import load_tokenizer

    teacher = ws.root / "teacher"
    shutil.copytree(ws.model, teacher)
    tokenizer = load_tokenizer(str(teacher))
    tokenizer.add_tokens(["<only-in-the-teacher>"])
    tokenizer.save_pretrained(teacher)
    job = ws.job()
    job["method"] = "distill"
    job["distill"] = {"teacher": str(teacher)}
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["distill.teacher", "the student's (model.path)"],
        fix=["same tokenizer"],
        config_file=path,
    )


@case
def search_space_over_a_field_that_does_not_exist(ws: Workspace) -> Bad:
    job = ws.job()
    job["data"]["eval"] = [{"path": str(ws.train), "text_column": "sentence", "name": "dev"}]
    job["tune"] = {"search_space": {"training.learning_rate": "loguniform(1e-5, 1e-3)"}, "scheduler": "none"}
    path = ws.write(job)
    return Bad(
        lambda: plan_sweep(load_config(path), source=str(path)),
        where=["tune.search_space.training.learning_rate", "unknown key 'learning_rate'"],
        fix=["Allowed keys here:", " lr, "],
        config_file=path,
    )


@case
def bad_cron_expression(ws: Workspace) -> Bad:
    job = ws.write(ws.job())
    path = ws.write_text(
        "# orchestrator schedule retrain.yaml\n"
        f"job: {job.name}\n"
        f"watch: {{dir: {ws.root / 'incoming'}}}\n"
        "schedule:\n"
        "  trigger: cron\n"
        "  cron: '61 * * * *'\n",
        name="retrain.yaml",
    )
    line = ws.line_of(path, "cron: '61")
    return Bad(
        lambda: load_retrain(path),
        where=[f"{path}:{line}: schedule.cron", "(got '61 * * * *')"],
        fix=["five fields", "e.g. '0 3 * * *'"],
        config_file=path,
    )


@case
def unwritable_output_dir(ws: Workspace) -> Bad:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder anyway (see output_dir_is_a_file for a case root meets)")
    locked = ws.root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    job = ws.job()
    job["output"]["dir"] = str(locked)
    path, check = ws.preflighted(job)
    return Bad(
        check, where=["output.dir", f"cannot write to {locked}"], fix=["choose a writable output.dir"], config_file=path
    )


@case
def output_dir_is_a_file(ws: Workspace) -> Bad:
    job = ws.job()
    job["output"]["dir"] = str(ws.train)  # a file where a folder should be: unwritable even for root
    path, check = ws.preflighted(job)
    return Bad(
        check,
        where=["output.dir", f"cannot write to {ws.train}"],
        fix=["choose a writable output.dir"],
        config_file=path,
    )


@case
def run_name_with_a_slash(ws: Workspace) -> Bad:
    job = ws.job()
    job["name"] = "../outside/run"
    path = ws.write(job)
    line = ws.line_of(path, "name:")
    return Bad(
        lambda: load_config(path),
        where=[f"{path}:{line}: name", "(got '../outside/run')"],
        fix=["must be one plain folder name", "could write outside output.dir", "letters, digits"],
        config_file=path,
    )


@case
def run_name_dot_dot(ws: Workspace) -> Bad:
    job = ws.job()
    job["name"] = ".."
    path = ws.write(job)
    return Bad(
        lambda: load_config(path),
        where=["name", "(got '..')"],
        fix=["must be one plain folder name", "could write outside output.dir"],
        config_file=path,
    )


@case
def run_name_set_on_the_command_line(ws: Workspace) -> Bad:
    path = ws.write(ws.job())
    return Bad(
        lambda: load_config(path, ["name=runs/../../etc"]),
        where=["name", "(got 'runs/../../etc')"],
        fix=["must be one plain folder name"],
        config_file=path,
        extra_cli_args=["--set", "name=runs/../../etc"],
    )


@case
def missing_environment_variable(ws: Workspace) -> Bad:
    job = ws.job()
    job["data"]["train"]["path"] = "${ORCHESTRATOR_TEST_UNSET_DATA_DIR}/train.tsv"
    path = ws.write(job)
    return Bad(
        lambda: load_config(path),
        where=["environment variable ORCHESTRATOR_TEST_UNSET_DATA_DIR is not set"],
        fix=["export it or use ${VAR:-default}"],
        config_file=path,
    )


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def workspace(tiny_models: dict[str, Path], tmp_path: Path) -> Workspace:
    return Workspace(tmp_path, tiny_models["bert"])


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make starting Ray an error, and check afterwards that no Ray was started."""
    was_running = ray.is_initialized()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad input got as far as ray.init: the job would have taken cluster resources")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("ORCHESTRATOR_TEST_UNSET_DATA_DIR", raising=False)
    yield
    if not was_running:
        assert ray.is_initialized() is False


def _assert_names_where_and_what_to_do(text: str, bad: Bad) -> None:
    for needle in bad.where:
        assert needle in text, f"the message does not say where ({needle!r}):\n{text}"
    for needle in bad.fix:
        assert needle in text, f"the message does not say what to do ({needle!r}):\n{text}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_before_the_cluster(name: str, workspace: Workspace, no_cluster: None) -> None:
    bad = CASES[name](workspace)

    with pytest.raises(OrchestratorError) as caught:
        bad.check()

    _assert_names_where_and_what_to_do(str(caught.value), bad)


@pytest.mark.parametrize("name", list(CASES))
def test_validate_command_reports_it(
    name: str, workspace: Workspace, no_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = CASES[name](workspace)
    monkeypatch.setattr(cli.err_console, "width", 10_000)  # one line per line: needles are never wrapped

    result = CliRunner().invoke(cli.app, ["validate", *bad.extra_cli_args, str(bad.config_file)])

    assert result.exit_code == 1, result.output
    assert str(bad.config_file) in result.stderr
    _assert_names_where_and_what_to_do(result.stderr, bad)


def test_there_are_at_least_fifteen_distinct_cases() -> None:
    assert len(CASES) >= 15


# --------------------------------------------------------------------------------------------------
# More workers than the cluster can ever hold: needs a (small) cluster, and must not wait for one
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_cluster() -> Any:
    """A 2-CPU local Ray instance of this test's own (or the session's, when one is already running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("scaling", "where", "fix"),
    [
        ({"num_workers": 64}, "64 workers x 1 CPU", "lower scaling.num_workers or scaling.cpus_per_worker"),
        (
            {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 64},
            "2 workers x 64 GPU",
            "lower scaling.num_workers or set scaling.use_gpu: false",
        ),
    ],
    ids=["more-cpus-than-the-cluster", "more-gpus-than-the-cluster"],
)
def test_a_job_the_cluster_can_never_hold_fails_at_once(
    scaling: dict[str, Any], where: str, fix: str, workspace: Workspace, small_cluster: Any
) -> None:
    job = workspace.job()
    job["scaling"] = scaling
    config = config_from_dict(job)
    groups_before = set(ray.util.placement_group_table())

    started = time.monotonic()
    with pytest.raises(OrchestratorError) as caught:
        run_training(config)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert "can never be scheduled on this cluster" in message
    assert where in message and fix in message, message
    assert elapsed < 60, f"took {elapsed:.0f} s: it waited for resources instead of failing"
    assert set(ray.util.placement_group_table()) == groups_before  # no workers were reserved
