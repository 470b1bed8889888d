"""Run configs: strict YAML loading, dotted overrides with type coercion, `base:` files, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (
    ConfigError,
    OptimConfig,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
    to_dict,
)
from training.encoder import EncoderRunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "training" / "configs" / "encoder"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_yaml_key_names_key_file_and_alternatives(tmp_path: Path) -> None:
    cfg = write(tmp_path / "run.yaml", "optim:\n  lr: 1.0e-3\n  weigth_decay: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(EncoderRunConfig, cfg)
    message = str(info.value)
    assert str(cfg) in message
    assert "'optim.weigth_decay'" in message
    assert "did you mean 'optim.weight_decay'" in message


def test_unknown_top_level_section_and_cli_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "run.yaml", "optimiser:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'optimiser'.*did you mean 'optim'"):
        load_config(EncoderRunConfig, cfg)
    with pytest.raises(ConfigError, match=r"command line \(--loop\.epoch\): unknown key 'loop\.epoch'"):
        load_config(EncoderRunConfig, None, ["--loop.epoch=3"])


def test_overrides_are_coerced_to_field_types() -> None:
    cfg = load_config(
        EncoderRunConfig,
        None,
        ["--optim.lr=5e-4", "--loop.epochs", "7", "--loop.precision=bf16", "--optim.betas=[0.8, 0.95]",
         "--head.stage_override_steps=[100, null]", "--eval.bin_files=[a.bin, b.bin]", "--data.hflip=false",
         "--model.checkpoint_path=null", "--output_dir=123"],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.loop.epochs == 7 and cfg.loop.precision == "bf16"
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.head.stage_override_steps == (100, None)
    assert cfg.eval.bin_files == ("a.bin", "b.bin")
    assert cfg.data.hflip is False
    assert cfg.model.checkpoint_path is None
    assert cfg.output_dir == "123"  # a string field keeps the text as typed


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("--loop.epochs=2.5", r"loop\.epochs must be an integer, got '2\.5'"),
        ("--optim.lr=fast", r"optim\.lr must be a number, got 'fast'"),
        ("--loop.precision=fp8", r"loop\.precision must be one of 'fp32', 'bf16', 'fp16'"),
        ("--data.hflip=maybe", r"data\.hflip must be true or false"),
        ("--optim.betas=[0.9]", r"optim\.betas must be a list of 2 items"),
        ("--head.stage_override_steps=[100, x]",
         r"^command line \(--head\.stage_override_steps\): head\.stage_override_steps\[1\] must be an integer or null, "
         r"got 'x'$"),
        ("--optim.lr=-1", r"command line \(--optim\.lr\): invalid 'optim': lr must be > 0"),
        ("--data.synthetic.num_pairs=3", r"invalid 'data\.synthetic'.*num_pairs must be an even int"),
    ],
)
def test_bad_values_name_key_and_expectation(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(EncoderRunConfig, None, [override])


def test_yaml_float_without_dot_and_lora_section(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` as a string; the float field still accepts it.
    cfg = write(tmp_path / "run.yaml", "optim:\n  lr: 1e-3\nlora:\n  r: 4\n")
    loaded = load_config(EncoderRunConfig, cfg)
    assert loaded.optim.lr == pytest.approx(1e-3)
    assert loaded.lora == {"r": 4}  # peft.LoraConfig arguments, read over the encoder's defaults
    assert load_config(EncoderRunConfig, cfg, ["--lora=null"]).lora is None
    # A LoRA section can also be switched on from the command line alone.
    assert load_config(EncoderRunConfig, None, ["--lora.r=2"]).lora == {"r": 2}
    # The old field names are not LoraConfig's: the error names the key and the right one.
    with pytest.raises(ConfigError, match=r"unknown LoRA key 'rank'.*'r'"):
        load_config(EncoderRunConfig, None, ["--lora.rank=2"])


def test_base_inheritance_merges_sections_and_reports_the_right_file(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "optim:\n  lr: 2.0e-3\n  weight_decay: 0.05\nloop:\n  epochs: 3\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(EncoderRunConfig, child)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loop.epochs) == (1e-4, 0.05, 3)
    write(tmp_path / "base.yaml", "loop:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'loop\.epochz'"):
        load_config(EncoderRunConfig, child)
    write(tmp_path / "base.yaml", "base: child.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(EncoderRunConfig, child)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(EncoderRunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(EncoderRunConfig, write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_parse_overrides_forms_and_errors() -> None:
    assert parse_overrides(["--a.b=1", "--c", "x y"]) == {"a.b": "1", "c": "x y"}
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_overrides(["a.b=1"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a.b"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(EncoderRunConfig, CONFIG_DIR / "tiny_synthetic.yaml", ["--optim.lr=3e-3", "--lora.r=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(EncoderRunConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert read_yaml(tmp_path / "config.yaml") == to_dict(cfg)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("[!_]*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(EncoderRunConfig, path)
    assert cfg.optim.lr > 0 and cfg.data.batch_size >= 1


def test_published_recipes_match_the_reference() -> None:
    """arcface_torch ViT recipes: CosFace 0.4 / s 64, AdamW 1e-3 wd 0.1, 384 per GPU, 40 epochs, 4 warm-up."""
    recipes = sorted(CONFIG_DIR.glob("lvface_*_wf42m.yaml")) + sorted(CONFIG_DIR.glob("lvface_*_glint360k.yaml"))
    assert len(recipes) == 8
    sizes = {"wf42m": 2_059_906, "glint360k": 360_232}
    for path in recipes:
        cfg = load_config(EncoderRunConfig, path)
        assert (cfg.head.margin, cfg.head.scale, cfg.head.margin_value) == ("cosface", 64.0, 0.4), path
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (1e-3, 0.1, (0.9, 0.999)), path
        assert (cfg.data.batch_size, cfg.loop.epochs, cfg.optim.warmup_epochs) == (384, 40, 4.0), path
        assert cfg.data.source == "recordio" and cfg.data.num_classes == sizes[path.stem.split("_")[-1]], path
        assert cfg.head.sample_rate in (0.1, 0.3), path


def test_stage_scheduler_smoothing_reaches_the_scheduler(tmp_path: Path) -> None:
    from training.encoder import build_head

    cfg = write(tmp_path / "run.yaml", "head:\n  kind: pco\n  stage_window: 5\n  min_steps_per_stage: 40\n")
    config = load_config(EncoderRunConfig, cfg)
    _, scheduler = build_head(config, 16, 10)
    assert (scheduler.window, scheduler.min_steps_per_stage) == (5, 40)
    # min_steps_per_stage acts: values far above delta1 = 0.2 do not switch during the first 40 steps.
    values = [0.9] * 35 + [0.0] * 5
    assert [scheduler.update(v, step) for step, v in enumerate(values)] == [1] * 40
    # The window acts: one value of 0.9 after four zeros averages to 0.18 < 0.2, no switch ...
    assert scheduler.update(0.9, 40) == 1 and scheduler.smoothed == pytest.approx(0.18)
    # ... a second one lifts the mean to 0.36 and switches.
    assert scheduler.update(0.9, 41) == 2 and scheduler.switch_steps == {2: 41}
    defaults = load_config(EncoderRunConfig, None, ["--head.stage_window=3"])
    _, scheduler = build_head(defaults, 16, 10)
    assert (scheduler.window, scheduler.min_steps_per_stage) == (3, 0)
    with pytest.raises(ConfigError, match="stage_window must be >= 1"):
        load_config(EncoderRunConfig, None, ["--head.stage_window=0"])
    with pytest.raises(ConfigError, match="min_steps_per_stage must be >= 0"):
        load_config(EncoderRunConfig, None, ["--head.min_steps_per_stage=-1"])
    with pytest.raises(ConfigError, match="only apply to kind: pco"):
        load_config(EncoderRunConfig, None, ["--head.kind=partial_fc", "--head.stage_window=4"])


def test_every_mistake_in_a_file_is_listed_with_its_field_and_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "run.yaml", "optim:\n  lr: fast\n  betas: [0.9]\nloop:\n  epochs: 2.5\neval: 3\n"
                                       "head:\n  stage_override_steps: [100, x]\n")
    with pytest.raises(ConfigError) as info:
        load_config(EncoderRunConfig, cfg)
    lines = str(info.value).splitlines()
    assert sorted(lines) == sorted([
        f"{cfg}: optim.lr must be a number, got 'fast'",
        f"{cfg}: optim.betas must be a list of 2 items, got '[0.9]'",
        f"{cfg}: loop.epochs must be an integer, got '2.5'",
        f"{cfg}: eval must be a mapping of EvalConfig fields, got '3'",
        f"{cfg}: head.stage_override_steps[1] must be an integer or null, got 'x'",
    ])


def test_adapter_config_errors_name_nested_keys_and_their_file(tmp_path: Path) -> None:
    from training.adapter import AdapterRunConfig, StageConfig

    write(tmp_path / "base.yaml", "data:\n  path: vqa\nstage2:\n  optim:\n    lrr: 1.0e-4\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nstages: [2]\n")
    pattern = r"base\.yaml: unknown key 'stage2\.optim\.lrr' \(did you mean 'stage2\.optim\.lr'\?\); keys allowed in "
    with pytest.raises(ConfigError, match=pattern + r"'stage2\.optim': lr, weight_decay"):
        load_config(AdapterRunConfig, child)
    write(tmp_path / "base.yaml", "data:\n  path: vqa\n")
    cfg = load_config(AdapterRunConfig, child, ["--stage2.optim.lr=1e-4", "--model.tiny.hidden_size=48"])
    # pydantic builds the plain frozen dataclasses themselves, nested defaults included
    assert type(cfg) is AdapterRunConfig and type(cfg.stage2) is StageConfig and type(cfg.stage2.optim) is OptimConfig
    assert (cfg.stages, cfg.stage2.optim.lr, cfg.model.tiny) == ((2,), 1e-4, {"hidden_size": 48})
    with pytest.raises(AttributeError):
        cfg.stage2.optim.lr = 1.0  # type: ignore[misc]


def test_an_unknown_section_from_the_command_line_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^command line \(--optimiser\.lr\): unknown key 'optimiser' "
                                          r"\(did you mean 'optim'\?\)"):
        load_config(EncoderRunConfig, None, ["--optimiser.lr=1"])


@pytest.mark.parametrize("path", sorted((CONFIG_DIR.parent / "adapter").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_adapter_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    from training.adapter import AdapterRunConfig

    cfg = load_config(AdapterRunConfig, path)
    assert cfg.stage2.optim.lr > 0 and cfg.data.path and cfg.stages
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(AdapterRunConfig, tmp_path / "config.yaml") == cfg
