from pathlib import Path

import pytest
import yaml

from distlm.config import (Config, ConfigError, all_keys, batch_layout, load_config, save_config,
                           validate)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    from distlm.parallel.layout import Layout
    from distlm.train.parallelize import check_model_fits

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for dp in (1, 4):  # the smallest world its layout runs on, and a few replicas of it
        world = cfg.parallel.tp * cfg.parallel.pp * dp
        layout = validate(cfg, world_size=world)
        assert layout.global_batch == cfg.train.batch_size
        if cfg.model.vocab_size is not None and cfg.train.seq_len is not None:
            check_model_fits(cfg, Layout.for_world(cfg.parallel.tp, cfg.parallel.pp, world))


def test_overrides_set_nested_keys_with_types():
    cfg = load_config(None, ["train.max_steps=100", "optim.lr=3e-4", "model.pos=rope",
                             "model.bias=true", "run.dir=runs/x", "deepspeed.zero_optimization.overlap_comm=true"])
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.pos == "rope" and cfg.model.bias is True and cfg.run.dir == "runs/x"
    assert cfg.deepspeed == {"zero_optimization": {"overlap_comm": True}}


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  batch_size: 4\n")
    cfg = load_config(path, ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 4)


@pytest.mark.parametrize("override, words", [
    ("train.max_step=3", ["train.max_step", "max_steps"]),
    ("trian.max_steps=3", ["trian", "train"]),
    ("model.pos=abc", ["model.pos", "sinusoidal", "learned", "rope"]),
    ("train.max_steps=1.5", ["train.max_steps", "integer"]),
    ("model.bias=3", ["model.bias", "true or false"]),
    ("optim.lr=fast", ["optim.lr", "number"]),
    ("train.max_steps", ["key.sub=value"]),
])
def test_bad_overrides_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key model.n_layer .*n_layers"):
        load_config(path)


def test_python_tags_in_yaml_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def _valid(*overrides):
    return load_config(None, ["data.path=somewhere", *overrides])


@pytest.mark.parametrize("overrides, world, needle", [
    ((), 1, None),
    (("model.d_model=100", "model.n_heads=3"), 1, "model.d_model=100"),
    (("model.n_heads=4", "model.n_kv_heads=3"), 1, "n_kv_heads"),
    (("parallel.zero_stage=4",), 1, "parallel.zero_stage"),
    (("parallel.tp=2",), 3, "parallel.tp"),
    (("parallel.tp=2", "parallel.pp=2"), 6, "parallel.tp x parallel.pp"),
    (("parallel.pp=2", "parallel.zero_stage=2"), 2, "ZeRO stage 0 or 1 only"),
    (("train.batch_size=12",), 5, "train.batch_size=12"),
    (("train.batch_size=12", "train.micro_batch_size=4"), 2, "train.batch_size=12"),
    (("optim.min_lr=0.1", "optim.lr=0.01"), 1, "optim.min_lr"),
    (("model.dropout=1.5",), 1, "model.dropout"),
    (("train.max_steps=0",), 1, "train.max_steps"),
    (("metrics.port=0",), 1, "metrics.port"),
    (("fault.max_bad_steps_in_row=0",), 1, "fault.max_bad_steps_in_row"),
    (("fault.spike_factor=0.5",), 1, "fault.spike_factor"),
    (("fault.collective_timeout_s=0",), 1, "fault.collective_timeout_s"),
    (("fault.hang_timeout_s=-1",), 1, "fault.hang_timeout_s"),
    (("model.n_kv_heads=0",), 1, "model.n_kv_heads"),
    (("train.micro_batch_size=0",), 1, "train.micro_batch_size"),
    (("data.shuffle_blocks=0",), 1, "data.shuffle_blocks"),
    (("train.seq_len=0",), 1, "train.seq_len"),
    (("optim.decay_steps=0",), 1, "optim.decay_steps"),
    (("optim.eps=0",), 1, "optim.eps"),
    (("data.seed=-1",), 1, "data.seed"),
])
def test_validation_rejects_impossible_combinations(overrides, world, needle, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = _valid(*overrides)
    if needle is None:
        validate(cfg, world)
        return
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg, world)


def test_missing_data_path_is_an_error():
    with pytest.raises(ConfigError, match="data.path"):
        validate(load_config(None, []), 1)


def test_batch_layout_splits_the_global_batch():
    cfg = _valid("train.batch_size=24", "train.micro_batch_size=3")
    layout = batch_layout(cfg, 2)
    assert (layout.dp, layout.micro_batch_size, layout.grad_accum) == (2, 3, 4)
    assert batch_layout(_valid("train.batch_size=24"), 4).micro_batch_size == 6


def test_saved_config_loads_back_equal(tmp_path):
    cfg = _valid("model.pos=rope", "optim.lr=5e-4", "deepspeed.zero_optimization.overlap_comm=true")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 5e-4


def test_interface_keys_exist():
    keys = set(all_keys())
    for key in ("run.dir", "data.path", "train.max_steps", "train.log_every", "train.eval_every",
                "train.save_every", "train.resume", "optim.lr", "parallel.zero_stage", "parallel.tp",
                "parallel.pp"):
        assert key in keys


def test_data_sources_parse_into_typed_entries_and_round_trip(tmp_path):
    cfg = load_config(None, ["data.sources=[{path: a, weight: 3}, {path: b, name: code}]", "data.on_error=skip"])
    assert [(s.path, s.weight, s.name) for s in cfg.data.sources] == [("a", 3.0, None), ("b", 1.0, "code")]
    validate(cfg)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").data == cfg.data


@pytest.mark.parametrize("overrides, needle", [
    (["data.sources=[{path: a}]", "data.path=b"], "not both"),
    (["data.sources=[{path: a, weight: 0}]"], r"data.sources\[0\].weight must be positive"),
    (["data.sources=[{path: x/a}, {path: y/a}]"], "distinct names"),
    (["data.sources=[{path: a, wieght: 2}]"], r"unknown key data.sources\[0\].wieght \(did you mean 'weight'\?\)"),
    (["data.sources={path: a}"], "data.sources must be a list"),
    (["data.path=a", "data.on_error=ignore"], "data.on_error must be one of fail, skip"),
    (["data.path=a", "data.max_error_rate=1.5"], r"data.max_error_rate must be in \[0, 1\)"),
    (["data.path=pipe:curl -s http://h/ds/{}"], "allow_pipe"),
])
def test_bad_data_sources_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(load_config(None, overrides))
