"""Fixtures shared across test folders."""

import os

import pytest
from studyfixture import CONFIG, small_overrides


@pytest.fixture(scope="session")
def study_data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("study_data")


@pytest.fixture(scope="session")
def small_study(tmp_path_factory, study_data_root):
    """The uninterrupted small study (studyfixture.SMALL), run in this process on a local Ray
    that is stopped afterwards: (config, StudyResult)."""
    import ray

    from omgseg.platform.config import StudyConfig, load_config
    from omgseg.platform.study.driver import run_study

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = tmp_path_factory.mktemp("study") / "small"
    config = load_config(StudyConfig, CONFIG, small_overrides(study_data_root))
    try:
        result = run_study(config, out)
    finally:
        ray.shutdown()
    return config, result
