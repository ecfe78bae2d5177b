"""What counts as secret, and the masked copies: configs, overrides, Hydra's files, pickled
TrainingArguments. The end-to-end check (a real run, every file and MLflow record) is in
test_tracking.py."""

import copy
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TrainingArguments

from helpers import compose_cfg
from lorasweep.cli.callbacks import mask_yaml_file
from lorasweep.redaction import MASK, is_secret_key, mask_override, masked_container
from lorasweep.training.trainer import PicklableWithoutSecrets


@pytest.mark.parametrize("key", ["hub_token", "training.extra.hub_token", "token", "HF_TOKEN",
                                 "hubToken", "api_key", "apiKey", "APIKEY", "aws_access_key_id",
                                 "private_key", "db_password", "passwd", "client_secret",
                                 "credentials"])
def test_secret_key_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer_name_or_path", "model.tokenizer_name_or_path",
                                 "null_token", "pad_token", "pad_token_id", "max_tokens",
                                 "include_num_input_tokens_seen", "key", "secretary_count",
                                 "tracking.secret_keys", ""])
def test_not_secret_key_names(key):
    assert not is_secret_key(key)


def test_user_names_match_as_whole_words():
    assert is_secret_key("data.db_pin", ["pin"]) and is_secret_key("webhook_url", ["webhook_url"])
    assert not is_secret_key("spinner", ["pin"]) and not is_secret_key("db_pin")


def test_masked_config_keeps_interpolations_and_resolves_the_rest(monkeypatch):
    monkeypatch.setenv("LS_TEST_VAR", "resolved-value")
    cfg = compose_cfg(["model=tiny_bert", "+training.extra.hub_token=${oc.env:LS_TEST_VAR}",
                       "+training.extra.api_key=plain-value", "tracking.secret_keys=[seed]"],
                      "/tmp/unused")
    masked = masked_container(cfg, cfg.tracking.secret_keys)
    assert masked["training"]["extra"] == {"hub_token": "${oc.env:LS_TEST_VAR}", "api_key": MASK}
    assert masked["seed"] == MASK and masked["data"]["seed"] == MASK  # a user-named key
    assert masked["model"]["tokenizer_name_or_path"].endswith("model")  # resolved, not masked
    assert masked["data"]["null_token"] is None
    assert masked["tracking"]["secret_keys"] == ["seed"]


def test_interpolation_with_a_default_is_masked():
    cfg = OmegaConf.create({"token": "${oc.env:LS_NOT_SET_ANYWHERE,hf_default_secret}"})
    assert masked_container(cfg) == {"token": MASK}
    assert mask_override("+x.hub_token=${oc.env:A,hf_b}") == f"+x.hub_token={MASK}"


@pytest.mark.parametrize("given, expected", [
    ("+training.extra.hub_token=abc", f"+training.extra.hub_token={MASK}"),
    ("++training.extra.hub_token=abc", f"++training.extra.hub_token={MASK}"),
    ("training.extra.hub_token=${oc.env:T}", "training.extra.hub_token=${oc.env:T}"),
    ("model.tokenizer_name_or_path=/x", "model.tokenizer_name_or_path=/x"),
    ("~training.extra.hub_token", "~training.extra.hub_token"),
    ("--master_port", "--master_port"),
])
def test_overrides_are_masked_by_key(given, expected):
    assert mask_override(given) == expected


def test_hydra_yaml_is_masked_with_its_override_dirname(tmp_path):
    overrides = ["training=smoke", "+training.extra.hub_token=abc123", "seed=1"]
    hydra_yaml = tmp_path / "hydra.yaml"
    OmegaConf.save(OmegaConf.create({"hydra": {
        "run": {"dir": "${now:%H}"},
        "overrides": {"hydra": ["hydra.run.dir=x"], "task": overrides},
        "job": {"override_dirname": ",".join(sorted(overrides)), "env_set": {"HF_TOKEN": "t0"},
                "config": {"override_dirname": {"kv_sep": ":", "item_sep": "|",
                                                "exclude_keys": ["seed"]}}}}}), hydra_yaml)
    overrides_yaml = tmp_path / "overrides.yaml"
    OmegaConf.save(OmegaConf.create(overrides), overrides_yaml)
    assert mask_yaml_file(str(hydra_yaml)) and mask_yaml_file(str(overrides_yaml))
    hydra = OmegaConf.load(hydra_yaml).hydra
    assert hydra.overrides.task[1] == f"+training.extra.hub_token={MASK}"
    assert hydra.job.override_dirname == f"+training.extra.hub_token:{MASK}|training:smoke"
    assert hydra.job.env_set.HF_TOKEN == MASK
    assert OmegaConf.to_container(hydra.run) == {"dir": "${now:%H}"}  # left unresolved
    assert OmegaConf.load(overrides_yaml)[1] == f"+training.extra.hub_token={MASK}"
    assert "abc123" not in hydra_yaml.read_text() + overrides_yaml.read_text()
    assert not mask_yaml_file(str(overrides_yaml))  # nothing left to mask: not rewritten


def test_training_arguments_pickle_without_their_secrets(tmp_path):
    args = PicklableWithoutSecrets(output_dir=str(tmp_path), hub_token="hf_pickled_secret",
                                   report_to="none", learning_rate=0.25)
    path = tmp_path / "training_args.bin"
    torch.save(args, path)  # what the Trainer does
    assert b"hf_pickled_secret" not in path.read_bytes()
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is TrainingArguments  # loads without lorasweep
    assert loaded.hub_token is None and loaded.learning_rate == 0.25
    assert pickle.loads(pickle.dumps(args)).hub_token is None
    assert copy.deepcopy(args).hub_token == "hf_pickled_secret" == copy.copy(args).hub_token
