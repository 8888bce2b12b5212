"""torchslim search: the search block's validation, a search end to end (front, best.yaml that torchslim run
reproduces), failing trials, the closest trial when none meets the constraints, resuming."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, digits_recipe, write_recipe
from torchslim import Registry, run
from torchslim.engine.errors import OutputError, RecipeError, UsageError
from torchslim.engine.study_fields import SearchSpec
from torchslim.engine.timing import LATENCY_THREADS
from torchslim.search import search
from torchslim.search.front import pareto
from torchslim.search.records import ATTRIBUTE, Record, trial_folder
from torchslim.search.space import size
from torchslim.search.study import STUDY_FILE, STUDY_NAME, covered

pytestmark = pytest.mark.usefixtures("one_thread")
#: The tests that run trials need Optuna (the search extra, in dev); the recipe checks before it do not.
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install 'torchslim[search]'")

STAGES = [
    {"type": "prune", "name": "prune", "method": "magnitude", "amount": 0.5},
    {"type": "quantize", "name": "int8", "method": "dynamic"},
]


def search_recipe(space: dict[str, Any], **search: Any) -> dict[str, Any]:
    """A small digits recipe (a 3-epoch MLP, one thread) with a search block: 3 trials over ``space`` by default."""
    recipe = digits_recipe([dict(s) for s in STAGES], train_epochs=3)
    recipe["threads"] = 1
    recipe["search"] = {"space": space, "objectives": ["metric", "size"], "trials": 3, **search}
    return recipe


def line_of(path: Path, text: str) -> int:
    """The line number of the first line of ``path`` holding ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        (
            {"stages.0.amount": {"low": 0.1, "high": 1.5}},
            {},
            r"stages\[0\]\.amount \(prune\): Input should be less than 1 \(search value stages\.0\.amount=1\.5\)",
        ),
        (
            {"stages.0.amount": {"low": 0.1, "hihg": 0.5}},
            {},
            r"search\.space\.stages\.0\.amount\.hihg: unknown field 'hihg'; did you mean 'high'\?",
        ),
        (
            {"stages.0.amount": {"low": 0.8, "high": 0.1}},
            {},
            r"search\.space\.stages\.0\.amount: low \(0\.8\) must be below high \(0\.1\)",
        ),
        (
            {"stages.0.amount": {"low": 0.1, "high": 0.8, "choices": [0.5]}},
            {},
            r"give choices or a range \(low, high\), not both",
        ),
        ({"stages.5.amount": {"low": 0.1, "high": 0.8}}, {}, r"sweep: 'stages\.5\.amount': stages has 2 entries"),
        (
            {
                "stages.1.bits": {"choices": [2, 4], "when": {"stages.1.method": "kbit"}},
                "stages.1.method": {"choices": ["dynamic", "kbit"]},
            },
            {},
            r"when: stages\.1\.method is sampled after it",
        ),
        (
            {"stages.0.amount": {"low": 0.1, "high": 0.8}},
            {"trials": None},
            r"search: give the search a budget: trials, minutes or both",
        ),
        (
            {"stages.0.amount": {"low": 0.1, "high": 0.8}},
            {"objectives": ["metric", "latecny"]},
            r"search\.objectives\[1\]: Input should be",
        ),
        (
            {"stages.0.amount": {"low": 0.1, "high": 0.8}},
            {"samplr": "tpe"},
            r"search\.samplr: unknown field 'samplr'; did you mean 'sampler'\?",
        ),
    ],
    ids=[
        "value-refused-at-its-line",
        "did-you-mean",
        "low-above-high",
        "choices-and-range",
        "no-such-stage",
        "when-after",
        "no-budget",
        "unknown-objective",
        "unknown-search-field",
    ],
)
def test_search_errors_name_the_line(
    tmp_path: Path, registry: Registry, space: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    recipe = search_recipe(space, **extra)
    recipe["search"] = {k: v for k, v in recipe["search"].items() if v is not None}
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(RecipeError) as info:
        search(path, tmp_path / "out", registry=registry)
    first = str(info.value).splitlines()[0]
    assert re.search(message, first), first
    where = int(re.match(r".*recipe\.yaml:(\d+):\d+: ", first).group(1))  # type: ignore[union-attr]
    assert where >= line_of(path, "search:")  # in the search block, where the mistake is
    assert not (tmp_path / "out" / "study.journal").exists()  # refused before anything ran


def test_the_refused_value_is_reported_at_its_space_entry(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump({k: v for k, v in search_recipe({}).items() if k != "search"}, sort_keys=False)
    path.write_text(text + "search:\n  trials: 2\n  space:\n    stages.0.amount: {low: 0.1, high: 1.5}\n")
    line = line_of(path, "stages.0.amount:")
    column = path.read_text().splitlines()[line - 1].index("1.5") + 1  # at the bound that is refused
    with pytest.raises(RecipeError, match=rf"recipe\.yaml:{line}:{column}: stages\[0\]\.amount"):
        search(path, tmp_path / "out", registry=registry)


def test_objectives_need_their_figures_measured(tmp_path: Path, registry: Registry) -> None:
    recipe = search_recipe({"stages.0.amount": {"low": 0.1, "high": 0.8}}, objectives=["metric", "latency"])
    recipe["metrics"]["latency"] = False
    with pytest.raises(RecipeError, match=r"search: latency needs metrics\.latency on, and the recipe turns it off"):
        search(write_recipe(tmp_path, recipe), tmp_path / "out", registry=registry)


def test_a_recipe_is_a_sweep_or_a_search(tmp_path: Path, registry: Registry) -> None:
    recipe = search_recipe({"stages.0.amount": {"low": 0.1, "high": 0.8}})
    recipe["sweep"] = {"stages.0.amount": [0.3]}
    with pytest.raises(RecipeError, match=r"search: a recipe with sweep is run by torchslim compare"):
        search(write_recipe(tmp_path, recipe), tmp_path / "out", registry=registry)


def test_run_refuses_a_search_recipe(tmp_path: Path, registry: Registry) -> None:
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"low": 0.1, "high": 0.8}}))
    with pytest.raises(RecipeError, match=r"search: this recipe is a search over many variants; run it with `torchslim search"):
        run(path, registry=registry)


def test_jobs_below_one_are_refused(tmp_path: Path, registry: Registry) -> None:
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"low": 0.1, "high": 0.8}}))
    with pytest.raises(UsageError, match=r"--jobs 0: give at least 1"):
        search(path, tmp_path / "out", jobs=0, registry=registry)


@needs_optuna
def test_parallel_trials_share_the_cores(tmp_path: Path, cli: Any) -> None:
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"low": 0.2, "high": 0.8}}, trials=3))
    result = cli("search", str(path), "--out", str(tmp_path / "out"), "--jobs", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "front.json").read_text())
    assert [t["trial"] for t in data["trials"]] == [1, 2, 3] and all("error" not in t for t in data["trials"])
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for trial in data["trials"]:
        saved = yaml.safe_load((tmp_path / "out" / trial["folder"] / "recipe.yaml").read_text())
        assert saved["metrics"]["threads"] == min(share, LATENCY_THREADS) and saved["threads"] == 1  # the recipe asked for 1
    assert "search: up to 2 trials at once" in result.stderr
    assert "best.yaml: trial" in result.stdout
    # trial 3 starts as soon as trial 1 or 2 ends, not after both (a batch waits for its slowest)
    spans = _spans(tmp_path / "out")
    assert spans[3][0] < max(spans[1][1], spans[2][1]) and spans[3][0] >= min(spans[1][1], spans[2][1])


def _spans(out: Path) -> dict[int, tuple[float, float]]:
    """Each trial's start and end in the search's study, by its search number."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(out / STUDY_FILE))))
    return {
        t.user_attrs[ATTRIBUTE]["number"]: (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        for t in study.get_trials()
    }


def test_without_optuna_the_error_names_the_extra(tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"low": 0.1, "high": 0.8}}))
    with pytest.raises(UsageError, match=r"torchslim search needs Optuna: pip install 'torchslim\[search\]'"):
        search(path, tmp_path / "out", registry=registry)


# A search whose second dimension fails at run time with one of its two values (every layer excluded: the prune
# stage has nothing to prune), random sampling: seed 3 gives both values in 4 trials.
FAILING = {"stages.0.amount": {"low": 0.2, "high": 0.8}, "stages.0.exclude": {"choices": [["0"], ["*"]]}}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Record]]:
    folder = tmp_path_factory.mktemp("search")
    recipe = search_recipe(FAILING, trials=4, sampler="random", seed=3)
    recipe["constraints"] = {"max_accuracy_drop": 50.0}
    path = write_recipe(folder, recipe)
    result = search(path, folder / "out", registry=Registry.load(autoload=False))
    return path, folder / "out", result.records


@needs_optuna
def test_every_trial_is_recorded_and_failures_do_not_stop_the_search(searched: tuple[Path, Path, list[Record]]) -> None:
    _, out, records = searched
    assert [r.number for r in records] == [1, 2, 3, 4]
    failed = [r for r in records if not r.ok]
    ran = [r for r in records if r.ok]
    assert failed and ran, [r.values for r in records]  # the seed gives both
    assert all(r.values["stages.0.exclude"] == ["*"] and "stage prune" in (r.error or "") for r in failed)
    data = json.loads((out / "front.json").read_text())
    assert [t.get("error") is not None for t in data["trials"]] == [not r.ok for r in records]
    assert "failed: trial" in (out / "front.md").read_text()
    assert sorted(p.name[:3] for p in (out / "trials").iterdir()) == ["001", "002", "003", "004"]


@needs_optuna
def test_front_and_best_yaml_that_run_reproduces(searched: tuple[Path, Path, list[Record]]) -> None:
    _, out, records = searched
    data = json.loads((out / "front.json").read_text())
    ran = [r for r in records if r.ok]
    assert set(data["front"]) == {r.number for r in pareto(ran, ["metric", "size"])}
    best = next(r for r in records if r.number == data["best"]["trial"])
    assert data["best"]["meets_constraints"] and best.final["accuracy"] == max(
        r.final["accuracy"] for r in ran if r.number in data["front"]
    )
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial" in (out / "front.md").read_text()
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# torchslim search: trial {best.number}, the best accuracy")
    recipe = yaml.safe_load(text)
    assert "search" not in recipe and "constraints" not in recipe and recipe["name"] == f"test-trial{best.number}"
    report = run(out / "best.yaml", registry=Registry.load(autoload=False))
    assert report.final.metrics["accuracy"] == best.final["accuracy"]
    assert report.final.metrics["size_bytes"] == best.final["size_bytes"]


@needs_optuna
def test_resume_runs_only_the_new_trials(tmp_path: Path, registry: Registry) -> None:
    space = {"stages.0.amount": {"low": 0.2, "high": 0.8}}
    path = write_recipe(tmp_path, search_recipe(space, trials=2))
    first = search(path, tmp_path / "out", registry=registry).records
    with pytest.raises(OutputError, match=r"holds a search \(study.journal\); add --resume to continue it"):
        search(path, tmp_path / "out", registry=registry)
    write_recipe(tmp_path, search_recipe(space, trials=3))  # a bigger budget: the search goes on
    again = search(path, tmp_path / "out", resume=True, registry=registry).records
    assert again[:2] == first and len(again) == 3
    assert len(list((tmp_path / "out" / "trials").iterdir())) == 3
    assert search(path, tmp_path / "out", resume=True, registry=registry).records == again  # spent: nothing runs
    write_recipe(tmp_path, search_recipe({"stages.0.amount": {"low": 0.3, "high": 0.8}}, trials=3))
    with pytest.raises(OutputError, match=r"holds a search of another recipe"):
        search(path, tmp_path / "out", resume=True, registry=registry)


@needs_optuna
def test_a_finite_space_under_a_budget_of_minutes_ends_when_every_value_is_tried(tmp_path: Path, registry: Registry) -> None:
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"choices": [0.3, 0.6]}}, trials=None, minutes=3))
    result = search(path, tmp_path / "out", registry=registry)
    assert sorted(r.values["stages.0.amount"] for r in result.records) == [0.3, 0.6]  # not repeated for 3 minutes


def test_the_size_of_a_space() -> None:
    spec = SearchSpec.model_validate({"space": {"a": {"choices": [1, 2, 3]}, "b": {"low": 2, "high": 4}}, "trials": 1})
    assert size(spec) == 9
    stepped = {"a": {"low": 0.1, "high": 0.5, "step": 0.1}}
    assert size(SearchSpec.model_validate({"space": stepped, "trials": 1})) == 5
    assert size(SearchSpec.model_validate({"space": {"a": {"low": 0.1, "high": 0.5}}, "trials": 1})) is None
    conditional = {"a": {"choices": [1, 2]}, "b": {"choices": [3, 4], "when": {"a": 1}}}
    assert size(SearchSpec.model_validate({"space": conditional, "trials": 1})) is None


def test_a_per_unit_value_names_the_trial_folder_by_its_settings() -> None:
    values = {"stages.0.group_amounts": {"encoder.layer.0.dense": 0.45, "encoder.layer.1.dense": 0.6}, "stages.1.epochs": 2}
    assert trial_folder(3, values) == "003-stages.0.group_amounts=0.45+0.6_stages.1.epochs=2"  # not the unit names
    assert trial_folder(12, {"stages.0.amount": 0.43716}) == "012-stages.0.amount=0.4372"


def test_covered_counts_overlapping_spans_once() -> None:
    assert covered([]) == 0.0
    assert covered([(0.0, 10.0), (1.0, 10.0)]) == 11.0  # two parallel trials: 11 s of wall time, not 20
    assert covered([(5.0, 1.0), (0.0, 2.0), (1.0, 0.5)]) == 3.0  # apart, and one inside another


@needs_optuna
def test_a_resumed_parallel_search_counts_its_earlier_minutes_once(tmp_path: Path, registry: Registry) -> None:
    space = {"stages.0.amount": {"low": 0.2, "high": 0.8}}
    path = write_recipe(tmp_path, search_recipe(space, trials=2))
    first = search(path, tmp_path / "out", jobs=2, registry=registry).records  # one batch of two, side by side
    seconds = [r.seconds for r in first]
    # a budget between the batch's wall time (about its longer trial) and the sum of the two trials' seconds
    minutes = 1.25 * max(seconds) / 60
    assert 1.25 * max(seconds) < sum(seconds)
    write_recipe(tmp_path, search_recipe(space, trials=4, minutes=minutes))
    again = search(path, tmp_path / "out", jobs=2, resume=True, registry=registry).records
    assert again[:2] == first and len(again) == 4  # the batch's minutes counted once: time was left for another


@needs_optuna
def test_none_meets_the_constraints_the_closest_is_saved_and_named(tmp_path: Path, cli: Any) -> None:
    recipe = search_recipe({"stages.0.amount": {"low": 0.2, "high": 0.8}}, trials=2)
    recipe["constraints"] = {"max_size_mb": 0.001, "max_accuracy_drop": 50.0}  # 1 kB: no digits MLP is that small
    path = write_recipe(tmp_path, recipe)
    result = cli("search", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "front.json").read_text())
    best = data["best"]
    sizes = {t["trial"]: t["final"]["size_bytes"] for t in data["trials"]}
    assert not best["meets_constraints"] and best["trial"] == min(sizes, key=lambda n: sizes[n])  # the smallest misses least
    assert best["misses"] == [f"size {sizes[best['trial']] / 1e6:.4g}MB > 0.001MB"]
    text = (tmp_path / "out" / "best.yaml").read_text()
    assert text.startswith(
        f"# torchslim search: no trial meets the constraints; trial {best['trial']} is the closest: misses the budget by "
    )
    assert yaml.safe_load(text)["name"] == f"test-trial{best['trial']}-closest"
    assert "best.yaml: trial" in result.stdout and "misses the budget by" in result.stdout
    assert re.search(r"search: trial 2/2 \(\d+ s elapsed\): accuracy [\d.]+, size [\d.]+kB; misses: size", result.stderr)


def test_pareto_front_of_several_objectives() -> None:
    def record(number: int, objectives: list[float]) -> Record:
        return Record(number, {}, "", 0.0, objectives=objectives)

    records = [
        record(1, [90.0, 10.0, 5.0]),
        record(2, [95.0, 20.0, 5.0]),
        record(3, [89.0, 11.0, 5.0]),
        record(4, [90.0, 10.0, 4.0]),
    ]
    assert [r.number for r in pareto(records, ["metric", "size", "latency"])] == [2, 4]  # 1 and 3 are beaten by 4


def test_validate_checks_every_value_of_a_search_recipe(cli: Any, tmp_path: Path) -> None:
    result = cli("validate", "recipes/search-digits.yaml", "--no-import")
    assert result.returncode == 0, result.stderr
    assert "valid search recipe (each value of its 5 dimensions valid) 'search-digits' with 3 stages" in result.stdout
    text = (ROOT / "recipes" / "search-digits.yaml").read_text().replace("[dynamic, kbit]", "[dynamic, kbt]")
    (tmp_path / "bad.yaml").write_text(text)
    result = cli("validate", str(tmp_path / "bad.yaml"), "--no-import")
    assert result.returncode == 2 and "stages[2].method (quantize): Input should be" in result.stderr
    assert '(search value stages.2.method="kbt")' in result.stderr


@needs_optuna
def test_values_sampled_again_are_not_run_again(tmp_path: Path, registry: Registry) -> None:
    # Two possible values, four trials: at least two trials repeat an earlier one's values.
    path = write_recipe(tmp_path, search_recipe({"stages.0.amount": {"choices": [0.3, 0.6]}}, trials=4, sampler="random"))
    records = search(path, tmp_path / "out", registry=registry).records
    assert len(records) == 4
    folders = {p.name for p in (tmp_path / "out" / "trials").iterdir()}
    assert len(folders) == len({r.values["stages.0.amount"] for r in records}) <= 2
    for record in records:
        first = next(r for r in records if r.values == record.values)
        assert (record.final, record.folder) == (first.final, first.folder) and record.folder in folders


@needs_optuna
def test_a_conditional_dimension_is_sampled_only_when_its_condition_holds(tmp_path: Path, registry: Registry) -> None:
    space = {
        "stages.1.method": {"choices": ["dynamic", "kbit"]},
        "stages.1.bits": {"choices": [2, 8], "when": {"stages.1.method": "kbit"}},
    }
    # NSGA-II with a population of 2: its second generation is bred from the first.
    path = write_recipe(tmp_path, search_recipe(space, trials=4, sampler="nsga2", startup_trials=2, seed=1))
    records = search(path, tmp_path / "out", registry=registry).records
    assert {r.values["stages.1.method"] for r in records} == {"dynamic", "kbit"}, [r.values for r in records]
    for record in records:
        assert ("stages.1.bits" in record.values) == (record.values["stages.1.method"] == "kbit")
        saved = yaml.safe_load((tmp_path / "out" / "trials" / record.folder / "recipe.yaml").read_text())
        assert saved["stages"][1]["method"] == record.values["stages.1.method"]
        assert saved["stages"][1].get("bits") == record.values.get("stages.1.bits")  # int8 dynamic has no bits option


def test_seeds_next_to_each_other_sample_other_trials() -> None:
    """Seeds 0, 1 and 2 give three samples, not one shifted by a trial (as ``seed + number`` did)."""
    import optuna

    from torchslim.search.study import trial_seed

    def values(seed: int) -> list[float]:
        return [
            optuna.samplers.RandomSampler(seed=trial_seed(seed, n)).sample_independent(
                optuna.create_study(),
                optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={}, distributions={}),
                "x",
                optuna.distributions.FloatDistribution(0.0, 1.0),
            )
            for n in range(1, 9)
        ]

    first, second = values(0), values(1)
    assert values(0) == first  # the same seed, the same trials
    assert not set(first) & set(second)
    assert first[1:] != second[:-1]
