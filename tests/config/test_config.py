"""Config system: YAML composition, typed overrides, and one-line errors that name the fix."""

from __future__ import annotations

import pytest

from megatron_omni.config import ConfigError, load_config, validate
from megatron_omni.config.schema import DataSource

TINY = "configs/tiny/llm.yaml"


def test_tiny_config_composes_model_file_and_types():
    cfg = load_config(TINY)
    assert cfg.model.num_layers == 4 and cfg.model.num_query_groups == 2  # from configs/model/tiny_llm.yaml
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 3e-3
    assert cfg.data.blend == [DataSource(path="megatron_omni/assets/demo_text/corpus.jsonl", weight=1.0)]


def test_overrides_parse_yaml_values_and_swap_sections():
    cfg = load_config(TINY, ["parallel.tp=2", "train.steps=5", "optimizer.lr=1e-4", "parallel.vpp=null",
                             "model=configs/model/llama3_70b.yaml", "model.num_layers=8"])
    assert (cfg.parallel.tp, cfg.train.steps, cfg.optimizer.lr, cfg.parallel.vpp) == (2, 5, 1e-4, None)
    assert cfg.model.hidden_size == 8192 and cfg.model.num_layers == 8


@pytest.mark.parametrize("model", ["llama3_8b", "llama3_70b"])
def test_llama3_model_configs_match_hf_architecture(model):
    m = load_config(None, [f"model=configs/model/{model}.yaml"]).model
    expected = {"llama3_8b": (32, 4096, 14336, 32, 8), "llama3_70b": (80, 8192, 28672, 64, 8)}[model]
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == expected
    assert (m.vocab_size, m.rotary_base, m.rope_scaling, m.rope_scaling_factor) == (128256, 500000.0, True, 8.0)
    assert not m.tie_word_embeddings and m.head_dim == 128


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.stepz=5"], 1, "unknown config key 'train.stepz'; did you mean 'steps'?"),
        (["parallel.tp=3"], 3, "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.pp=3"], 3, "model.num_layers=4 cannot be split over parallel.pp=3 stages"),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by tp*pp*cp=2*1*1=2"),
        (["train.global_batch_size=10"], 4, "train.global_batch_size=10 is not divisible by train.micro_batch_size*dp=2*4=8"),
        (["parallel.pp=2", "parallel.vpp=4"], 2, "model.num_layers=4 is not divisible by parallel.pp*parallel.vpp=8"),
        (["train.steps=abc"], 1, "train.steps: expected an integer, got 'abc'"),
        (["train.precision=fp64"], 1, "train.precision='fp64' is not one of"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
        (["model.fp8=hybrid", "model.transformer_impl=local"], 1, "model.fp8 needs model.transformer_impl=transformer_engine"),
    ],
)
def test_errors_are_one_clear_line(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config(TINY, overrides), world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(TINY, ["train.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {(__import__('pathlib').Path(TINY).resolve())}\ntrain:\n  steps: 7\n")
    cfg = load_config(str(child))
    assert cfg.train.steps == 7 and cfg.train.global_batch_size == 16 and cfg.model.num_layers == 4


def test_entry_point_reports_config_error_and_exits_2(capsys):
    from megatron_omni.train import main

    assert main(["--config", TINY, "train.stepz=1"]) == 2
    assert "config error: unknown config key 'train.stepz'" in capsys.readouterr().err


def test_context_parallel_without_transformer_engine_is_a_config_error():
    from megatron_omni.models.kernels import detect_kernels

    if detect_kernels("auto").transformer_engine:
        pytest.skip("Transformer Engine present: context parallelism is available")
    with pytest.raises(ConfigError, match="parallel.cp=2 needs Transformer Engine attention"):
        validate(load_config(TINY, ["parallel.cp=2"]), 2)


def test_section_base_extends_a_model_file_and_child_base_replaces_inherited_section():
    c8 = load_config("configs/llama3_8b_pretrain.yaml")
    assert (c8.model.num_layers, c8.model.fp8, c8.model.transformer_impl) == (32, "hybrid", "transformer_engine")
    c70 = load_config("configs/llama3_70b_pretrain.yaml")  # base: the 8B run config, model base: 70B
    assert (c70.model.num_layers, c70.model.hidden_size, c70.model.fp8) == (80, 8192, "hybrid")
    assert (c70.parallel.tp, c70.parallel.pp, c70.parallel.vpp) == (4, 8, 5)
    assert c70.data.seq_length == c8.data.seq_length == 8192  # inherited untouched
    validate(c8, 8)
    validate(c70, 64)


def test_a_saved_config_with_retired_keys_still_loads(tmp_path, caplog):
    """A run directory written before train.deterministic / train.ckpt_format were retired: its
    config.yaml loads (resume, tools/generate.py) with one warning per key, not an unknown-key error."""
    saved = tmp_path / "config.yaml"
    saved.write_text(f"base: {__import__('pathlib').Path(TINY).resolve()}\ntrain: {{deterministic: true, ckpt_format: torch_dist, steps: 3}}\n")
    with caplog.at_level("WARNING", logger="megatron_omni.config"):
        cfg = load_config(str(saved))
    assert cfg.train.steps == 3 and not cfg.model.deterministic_mode
    assert "ignoring retired key train.deterministic" in caplog.text and "train.ckpt_format" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(str(saved), ["train.deterministic=true"])  # a user setting it now is told at once
