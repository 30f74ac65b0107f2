"""One configuration pattern: typed dataclasses, unknown keys and bad values named before any work."""

import subprocess
import sys

import pytest

from cxr_batch.config import ConfigError, load_dataclass
from cxr_batch.scan import ScanConfig
from cxr_batch.study import ScoringRules
from cxr_batch.watch import WatchConfig
from training.config import TrainConfig


def test_scan_config_from_tables_and_overrides():
    cfg = load_dataclass(ScanConfig, {"batch_size": 8, "urgent": ["Pneumothorax", "Edema"],
                                      "scoring": {"views": ["pa"], "max_pixels": 1000}}, "scan", batch_size=4)
    assert cfg.batch_size == 4 and cfg.urgent == ("Pneumothorax", "Edema")
    assert cfg.scoring.views == ("PA",) and cfg.scoring.max_pixels == 1000


@pytest.mark.parametrize("table, words", [
    ({"batchsize": 4}, ["unknown option", "'batchsize'"]),
    ({"batch_size": 0}, ["batch_size", "at least 1"]),
    ({"batch_size": "16"}, ["batch_size", "integer"]),
    ({"batch_size": True}, ["batch_size", "integer"]),
    ({"precision": "bf15"}, ["precision", "one of"]),
    ({"urgent": ["Pneumothorax", "Pneumothoraks"]}, ["urgent", "Pneumothoraks"]),
    ({"scoring": {"views": "PAP"}}, ["views", "list"]),
    ({"scoring": {"max_pixels": "40M"}}, ["max_pixels", "integer"]),
    ({"scoring": {"max_pixels": 0}}, ["max_pixels", "at least 1"]),
    ({"scoring": {"viewz": ["PA"]}}, ["viewz"]),
    ({"shard": [3, 2]}, ["shard"]),
])
def test_scan_config_errors_name_the_key(table, words):
    with pytest.raises(ConfigError) as e:
        load_dataclass(ScanConfig, table, "scan")
    for word in words:
        assert word in str(e.value)


def test_watch_config_checks_types_and_ranges():
    assert load_dataclass(WatchConfig, {"settle": 2}, "watch").settle == 2.0  # an integer is a number
    for bad in ({"batch_size": 0}, {"settle": -1.0}, {"rescan_interval": 0}, {"polling": "yes"}, {"nope": 1}):
        with pytest.raises(ConfigError):
            load_dataclass(WatchConfig, bad, "watch")


def test_scoring_rules_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="max_pixels"):
        ScoringRules(max_pixels=-5)
    assert ScoringRules(views=["ap"]).views == ("AP",)


def test_train_config_nests_model_and_preprocessing_and_rejects_typos_early():
    cfg = TrainConfig.load(None, image_size=96, epochs=1)
    assert cfg.preprocessing.image_size == 96 and cfg.epochs == 1 and cfg.model.dropout == 0.3
    with pytest.raises(ConfigError, match="select_metric"):
        TrainConfig(select_metric="mean_aucc")
    with pytest.raises(ConfigError, match="threshold_method"):
        TrainConfig(threshold_method="youdan")
    with pytest.raises(ConfigError, match="tabular_skip"):
        TrainConfig(patient_prior="logistic")
    with pytest.raises(ConfigError, match="Pneumonai"):
        TrainConfig(pos_weight_overrides={"Pneumonai": 4.5})
    with pytest.raises(ConfigError, match="dropout"):
        load_dataclass(TrainConfig, {"model": {"dropout": 1.5}}, "train")
    assert TrainConfig(patient_prior_weight="validation").patient_prior_weight == "validation"


def test_cli_names_the_bad_key_and_exits_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[scan]\nbatch_size = 8\n[scoring]\nviews = \"PAP\"\n")
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2 and "views" in proc.stderr and "Traceback" not in proc.stderr
    config.write_text("[scann]\nbatch_size = 8\n")
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2 and "scann" in proc.stderr
    config.write_text("[watch]\nbatch_size = 0\n")
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "watch", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2 and "batch_size" in proc.stderr


@pytest.mark.parametrize("table, hint", [
    ({"urgnet": ["Pneumothorax"]}, "did you mean 'urgent'?"),
    ({"batchsize": 8}, "did you mean 'batch_size'?"),
    ({"scoring": {"modality": ["CR"]}}, "did you mean 'modalities'?"),
])
def test_a_misspelt_key_is_named_with_the_one_meant(table, hint):
    # the message listed 29 known options and left the user to spot the one they meant
    with pytest.raises(ConfigError, match=hint):
        load_dataclass(ScanConfig, table, "scan")


def test_a_bad_scoring_key_is_named_in_the_table_the_file_has(tmp_path):
    # "[scan].scoring.views" sent the user looking for a [scan] table the file did not have
    config = tmp_path / "c.toml"
    config.write_text("[scoring]\nviews = \"PA\"\n")
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert f"{config} [scoring].views = 'PA'" in proc.stderr and "[scan]" not in proc.stderr, proc.stderr
    config.write_text("[scna]\nbatch_size = 8\n")
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'scan'?" in proc.stderr, proc.stderr


def test_a_table_written_as_a_value_or_an_option_above_its_table_is_said(tmp_path):
    # "scan = 8" ended in a TypeError traceback (the [scan] table read as a dict); "batch_size = 8"
    # above any table was 'unknown table or key' with no word of the [scan] it belongs in
    config = tmp_path / "c.toml"
    for text, said in (("scan = 8\n", "'scan' is a table ([scan], its options on the lines below it), not int"),
                       ("watch = \"x\"\n", "'watch' is a table ([watch], its options on the lines below it), not str"),
                       ("batch_size = 8\n", "'batch_size' is an option of [scan]: write it below a [scan] line")):
        config.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "cxr_batch", "scan", str(tmp_path), "--out", str(tmp_path / "o"),
                               "--config", str(config)], capture_output=True, text=True)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_list_of_the_wrong_kind_is_said_in_plain_words():
    # read "expected a list of a string"
    with pytest.raises(ConfigError, match=r"views = 'PA': expected a list of strings \(e.g."):
        load_dataclass(ScoringRules, {"views": "PA"}, "scoring")
    with pytest.raises(ConfigError, match="expected a list of 2 values|expected a list of integers"):
        load_dataclass(ScanConfig, {"shard": "0/4"}, "scan")


@pytest.mark.parametrize("table, words", [
    # README's [scan] table took "any option above": out = "..." was "unknown option 'out'" with
    # the list of known ones, leaving the operator to guess it is a command-line option
    ({"out": "/srv/results"}, ["'out' is given on the command line (--out)"]),
    ({"resume": True}, ["'resume' is given on the command line (--resume)"]),
    # --no-pdf copied as no_pdf = true: "did you mean 'pdf'?" left the value to guess
    ({"no_pdf": True}, ["'no_pdf'", "pdf = false"]),
])
def test_a_command_line_option_written_in_a_table_says_how_to_give_it(table, words):
    with pytest.raises(ConfigError) as e:
        load_dataclass(ScanConfig, table, "scan")
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("command, config", [
    (["listen"], "docs/watch.toml"),        # README's watch file given to the node: its institution,
    (["watch", "STUDIES"], "docs/node.toml"),  # batch size and drift settings were dropped without a word
    (["pull"], "docs/node.toml"),
    (["scan", "STUDIES"], "docs/watch.toml"),
])
def test_a_file_without_the_command_s_table_but_another_s_is_refused(tmp_path, command, config):
    # each command reads only its own table and [scoring]: `listen --config docs/watch.toml` started
    # with every [watch] setting silently at its default
    table = command[0]
    args = [str(tmp_path) if a == "STUDIES" else a for a in command]
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", *args, "--out", str(tmp_path / "o"),
                           "--config", config], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{config} has no [{table}] table" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert f"an empty [{table}] line" in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["scan", "watch"])
def test_a_misspelt_urgent_finding_in_a_file_names_the_file_and_its_table(tmp_path, command):
    # 'scan.urgent: unknown finding ...' named neither the file nor its [scan] table, where every
    # other mistake in a file reads "c.toml [scan]: ..."
    config = tmp_path / "c.toml"
    config.write_text(f"[{command}]\nurgent = [\"Pnemothorax\"]\n")
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, "-m", "cxr_batch", command, str(tmp_path / "in"), "--out",
                           str(tmp_path / "o"), "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (f"{config} [{command}].urgent: unknown finding 'Pnemothorax' (did you mean Pneumothorax"
            in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
