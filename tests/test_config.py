"""Config loading: presets, inheritance, dotted overrides, and one precise error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1.config import config_from_dict, load_config, to_dict
from mm1.registry import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_preset_loads_and_validates():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_dotted_override_changes_the_connector():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.connector.kind=attnpool", "train.steps=7"])
    assert cfg.model.connector.kind == "attnpool"
    assert cfg.train.steps == 7


def test_preset_inherits_from_its_base_and_overrides_fields():
    cfg = load_config(CONFIGS / "mm1-3b-moe.yaml")
    assert cfg.model.lm.n_experts == 64 and cfg.model.lm.moe_every == 2
    assert cfg.model.vision.image_size == 378 and cfg.model.connector.num_tokens == 144


def test_config_round_trips_through_a_dict():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.lm.n_layers=3"])
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("model.connector.num_tokens=50", "model.connector.num_tokens=50", "perfect square"),
        ("model.vision.image_size=60", "model.vision.image_size=60", "divisible by model.vision.patch_size=8"),
        (
            "model.connector.kind=qformer",
            "model.connector.kind='qformer'",
            "allowed: attnpool, avgpool, c_abstractor, mlp",
        ),
        ("model.vision.kind=resnet", "model.vision.kind='resnet'", "allowed: vit"),
        ("model.lm.kind=mamba", "model.lm.kind='mamba'", "allowed:"),
        ("model.vision.heads=5", "model.vision.heads=5", "must divide model.vision.width=128"),
        ("model.lm.n_heads=3", "model.lm.n_heads=3", "must divide model.lm.dim=256"),
        ("model.lm.n_kv_heads=3", "model.lm.n_kv_heads=3", "must divide model.lm.n_heads=4"),
        ("model.connector.num_tokens=20", "model.connector.num_tokens=20", "mlp connector keeps every patch"),
        ("train.stage=finetune", "train.stage='finetune'", "allowed: encoder, pretrain, sft"),
        ("data.sources.caption.weight=-1", "data.sources.caption.weight=-1", "must be >= 0"),
        ("data.caption_text=labels", "data.caption_text='labels'", "must be one of caption, tags"),
        ("train.lr_scale=0", "train.lr_scale=0", "must be positive (1.0 = the law)"),
    ],
)
def test_invalid_value_names_key_value_and_what_is_allowed(override, key, hint):
    extra = ["model.connector.kind=mlp"] if "mlp connector" in hint else []
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", extra + [override])
    assert key in str(err.value)
    assert hint in str(err.value)


def test_unknown_key_and_wrong_type_are_reported_by_key():
    with pytest.raises(ConfigError, match="model.connector.num_tokenz"):
        load_config(CONFIGS / "tiny.yaml", ["model.connector.num_tokenz=4"])
    with pytest.raises(ConfigError, match="model.lm.dim"):
        load_config(CONFIGS / "tiny.yaml", ["model.lm.dim=wide"])


def test_the_renamed_world_size_key_names_its_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"data.world_size='small'.*renamed; write data.world_preset=small"):
        load_config(CONFIGS / "tiny.yaml", ["data.world_size=small"])
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {CONFIGS / 'tiny.yaml'}\ndata:\n  world_size: base\n")
    with pytest.raises(ConfigError, match=r"in .*old.yaml.*write data.world_preset=base"):
        load_config(old)
    assert load_config(CONFIGS / "tiny.yaml", ["data.world_preset=small"]).data.world_preset == "small"


def test_a_checkpoint_saved_before_the_rename_still_loads_its_config(tmp_path):
    from mm1.config import to_yaml
    from mm1.train.checkpoint import read_config

    text = to_yaml(load_config(CONFIGS / "tiny.yaml", ["data.world_preset=small"]))
    assert "world_preset: small" in text
    (tmp_path / "config.yaml").write_text(text.replace("world_preset: small", "world_size: small"))
    assert read_config(tmp_path).data.world_preset == "small"  # written by an older mm1: migrated


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(CONFIGS / "tiny.yaml", ["model.lm.dim"])


def test_missing_preset_and_bad_yaml_say_which_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_a_component_registered_with_rules_has_them_checked_at_load(monkeypatch):
    import mm1.registry as registry

    monkeypatch.setattr(registry, "_SELECTED", [])  # the toy registry below alone decides the connector
    toy = registry.Registry("toy connector", "model.connector.kind", registry.at_key("model.connector.kind"))
    assert registry._SELECTED == [toy]

    def seven_tokens(cfg) -> None:
        registry.check(
            cfg.model.connector.num_tokens == 7,
            "model.connector.num_tokens",
            cfg.model.connector.num_tokens,
            "the toy connector makes 7 tokens",
        )

    toy.register("toy", validate=seven_tokens)(object)
    assert load_config(CONFIGS / "tiny.yaml", ["model.connector.kind=toy", "model.connector.num_tokens=7"])
    with pytest.raises(ConfigError, match="num_tokens=8: the toy connector makes 7 tokens"):
        load_config(CONFIGS / "tiny.yaml", ["model.connector.kind=toy", "model.connector.num_tokens=8"])
    with pytest.raises(ConfigError, match="'c_abstractor': unknown toy connector; allowed: toy"):
        load_config(CONFIGS / "tiny.yaml")


def test_the_config_layer_imports_no_component_package():
    import ast

    import mm1.config

    tree = ast.parse(Path(mm1.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    above = {
        m
        for m in imported
        if m.split(".")[:2] in (["mm1", p] for p in ("models", "train", "eval", "experiments", "export"))
    }
    assert not above, f"mm1.config imports {sorted(above)}; a component's rules belong with it (mm1.registry)"
