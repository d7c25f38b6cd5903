"""The profiles: the full recipe field by field, documented differences, the CLI and profile selection."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from helpers.hardware import cuda_available
from helpers.paths import REPO_ROOT
from helpers.profiles import PROFILE_ENV_VAR, PROFILE_NAMES, PROFILES, get_profile, resolve_profile_name

RECIPE_TARGETS = {"k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj"}

# The NeuralHermes-2.5-Mistral-7B recipe as its model card states it: section -> setting -> value.
SEED_RECIPE: dict[str, dict[str, Any]] = {
    "model": {"name": "teknium/OpenHermes-2.5-Mistral-7B"},
    "data": {"source": "hub", "dataset": "Intel/orca_dpo_pairs", "formatted_twin": "mlabonne/chatml_dpo_pairs"},
    "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True},
    "lora": {"r": 16, "alpha": 16, "dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"},
    "training": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "learning_rate": 5e-5,
        "lr_scheduler_type": "cosine",
        "max_steps": 200,
        "warmup_steps": 100,
        "optim": "paged_adamw_32bit",
        "precision": "auto",
    },
    "dpo": {"beta": 0.1, "max_prompt_length": 1024, "max_length": 1536},
}
SEED_CASES = [(section, key, value) for section, settings in SEED_RECIPE.items() for key, value in settings.items()]
NOT_SETTINGS = {"name", "description", "differences", "model.needs_gpu"}
cpu_only = pytest.mark.skipif(cuda_available(), reason="checks the choice made on a machine without CUDA")


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested settings to {"section.key": value}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "differences":
            flat.update(_leaves(value, f"{path}."))
        else:
            flat[path] = value
    return flat


@pytest.mark.parametrize(("section", "key", "value"), SEED_CASES, ids=[f"{s}.{k}" for s, k, _ in SEED_CASES])
def test_full_profile_matches_seed_recipe(section: str, key: str, value: Any) -> None:
    actual = getattr(getattr(get_profile("full", check_hardware=False), section), key)
    assert actual == value, f"full.{section}.{key} is {actual!r}, the recipe says {value!r}"


def test_full_profile_lora_targets_are_the_seven_mistral_projections() -> None:
    targets = get_profile("full", check_hardware=False).lora.target_modules
    assert set(targets) == RECIPE_TARGETS
    assert len(targets) == len(RECIPE_TARGETS)


@pytest.mark.parametrize("name", ["t4", "tiny"])
def test_every_difference_from_full_is_documented(name: str) -> None:
    full = _leaves(PROFILES["full"].to_dict())
    other = _leaves(PROFILES[name].to_dict())
    assert full.keys() == other.keys()
    differing = {key for key in full if full[key] != other[key] and key not in NOT_SETTINGS}
    assert differing, f"{name} should differ from full somewhere"
    documented = set(PROFILES[name].differences)
    undocumented = sorted(differing - documented)
    assert not undocumented, f"profile {name!r} differs from full in {undocumented} without saying why in differences"
    unknown = sorted(documented - full.keys())
    assert not unknown, f"profile {name!r} documents settings that do not exist: {unknown}"


def test_cli_prints_full_profile_as_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "helpers", "profile", "full"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["name"] == "full"
    for section, key, value in SEED_CASES:
        assert printed[section][key] == value, f"{section}.{key}"
    assert set(printed["lora"]["target_modules"]) == RECIPE_TARGETS


def test_cli_unknown_profile_exits_2_naming_valid_profiles() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "helpers", "profile", "a100"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "'a100'" in result.stderr
    for name in PROFILE_NAMES:
        assert name in result.stderr


def test_env_var_selects_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_ENV_VAR, "T4 ")
    assert resolve_profile_name() == ("t4", f"set by ${PROFILE_ENV_VAR}")
    assert get_profile(check_hardware=False).name == "t4"


def test_explicit_name_beats_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_ENV_VAR, "t4")
    assert resolve_profile_name("full")[0] == "full"


def test_unknown_env_var_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILE_ENV_VAR, "huge")
    with pytest.raises(ValueError, match="tiny, t4, full"):
        resolve_profile_name()


@cpu_only
def test_automatic_choice_on_cpu_is_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILE_ENV_VAR, raising=False)
    name, why = resolve_profile_name()
    assert name == "tiny"
    assert "no CUDA" in why
    assert get_profile().name == "tiny"


@cpu_only
@pytest.mark.parametrize("name", ["full", "t4"])
def test_gpu_profile_on_cpu_is_refused_pointing_to_tiny(name: str) -> None:
    with pytest.raises(RuntimeError, match="'tiny'"):
        get_profile(name)


@pytest.mark.parametrize(("memory", "expected"), [(79.1, "full"), (39.4, "full"), (31.7, "t4"), (23.6, "t4"),
                                                  (14.6, "t4")])
def test_the_gpu_memory_decides_between_t4_and_full(monkeypatch, memory: float, expected: str) -> None:
    """A "40 GB" A100 reports about 39.4 GiB and gets the card's recipe; 32 GB and smaller cards get t4."""
    from helpers import hardware

    monkeypatch.delenv(PROFILE_ENV_VAR, raising=False)
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "gpu_total_memory_gib", lambda device=0: memory)
    name, why = resolve_profile_name()
    assert name == expected and f"{memory:.1f} GiB" in why


def test_the_start_line_says_how_the_profile_was_chosen(monkeypatch, capsys) -> None:
    from helpers import notebook

    monkeypatch.setenv(PROFILE_ENV_VAR, "tiny")
    notebook.start(None, use_drive=False)  # what every notebook does with PROFILE = None under CI's environment
    assert capsys.readouterr().out.startswith("profile: tiny (set by $COURSE_PROFILE)")
    notebook.start("tiny", use_drive=False)
    assert capsys.readouterr().out.startswith("profile: tiny (asked for explicitly)")
