"""export --cv-report: the card's CV figures and thresholds only for networks of the CV's recipe."""

from dataclasses import asdict

import pytest

from training.cv_report import RECIPE_OPTIONS
from training.export import check_cv_recipe
from training.fitting import TrainConfig


def cv_report(folds_complete: list[int], **recipe: object) -> dict:
    segmenter = asdict(TrainConfig(model="segmenter", missing_sequences=0.25, init_encoder="classifier"))
    return {
        "folds": 5,
        "folds_complete": folds_complete,
        "recipe": {"networks": "separate", **{k: segmenter[k] for k in RECIPE_OPTIONS if k in segmenter}, **recipe},
    }


def networks(**segmenter_options: object) -> dict:
    """A --networks separate run as export loads it: the classifier keeps the segmenter-only options' defaults."""
    classifier = TrainConfig(model="classifier", missing_sequences=0.25)
    options = {"missing_sequences": 0.25, "init_encoder": "classifier", **segmenter_options}
    segmenter = TrainConfig(model="segmenter", **options)
    return {
        kind: (None, {"config": asdict(config)})
        for kind, config in (("classifier", classifier), ("segmenter", segmenter))
    }


def test_networks_of_the_cvs_recipe_export_with_its_figures() -> None:
    check_cv_recipe(networks(), cv_report([0, 1, 2, 3, 4]))


@pytest.mark.parametrize(
    ("segmenter_options", "named"),
    [({"init_encoder": None}, "segmenter init_encoder"), ({"augmentation": "scanner"}, "segmenter augmentation")],
)
def test_networks_of_another_recipe_are_refused(segmenter_options: dict, named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        check_cv_recipe(networks(**segmenter_options), cv_report([0, 1, 2, 3, 4]))


def test_a_classifier_of_another_recipe_is_refused() -> None:
    run = networks()
    run["classifier"][1]["config"]["epochs"] = 10
    with pytest.raises(SystemExit, match="classifier epochs: 10, CV 30"):
        check_cv_recipe(run, cv_report([0, 1, 2, 3, 4]))


def test_joint_networks_against_a_separate_cv_are_refused() -> None:
    joint = asdict(TrainConfig(model="joint", missing_sequences=0.25, init_encoder="classifier"))
    with pytest.raises(SystemExit, match="networks: 'joint', CV 'separate'"):
        check_cv_recipe(
            {"classifier": (None, {"config": joint}), "segmenter": (None, {"config": joint})},
            cv_report([0, 1, 2, 3, 4]),
        )


def test_an_older_report_without_a_newer_option_means_its_default() -> None:
    report = cv_report([0, 1, 2, 3, 4])
    del report["recipe"]["augmentation"]  # CVs before --augmentation trained the standard one
    check_cv_recipe(networks(), report)
    with pytest.raises(SystemExit, match="augmentation"):
        check_cv_recipe(networks(augmentation="scanner"), report)


def test_a_cv_with_unfinished_folds_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"folds \[3, 5\] of 5 unfinished"):
        check_cv_recipe(networks(), cv_report([0, 1, 3]))


def test_an_ensembles_cv_is_refused() -> None:
    with pytest.raises(SystemExit, match="ensemble"):
        check_cv_recipe(networks(), {"folds": 5, "folds_complete": [0, 1, 2, 3, 4], "recipe": {"ensemble_of": {}}})
