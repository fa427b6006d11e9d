"""configure(): config file then --key=value overrides, in order; typos and wrong types are one-line errors."""

import json

import pytest

from nanovlm.config import ConfigError, configure, defaults as settings_of


def module_scope() -> dict:
    """What train.py's vars() looks like after its defaults: settings, plus modules/functions/privates to ignore."""
    return {"learning_rate": 3e-4, "batch_size": 8, "compile": False, "out_dir": "out", "init_from": None,
            "betas": (0.9, 0.95), "json": json, "defaults": defaults, "_private": 1, "__name__": "__main__",
            "IGNORE": -100}


def defaults() -> dict:
    return settings_of(module_scope())


def write(tmp_path, text: str) -> str:
    path = tmp_path / "x.py"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "import math\n_micro = 4\nbatch_size = _micro * 8  # 32\nlearning_rate = 1e-3\n"
                           "out_dir = 'out-file'\n")
    base = defaults()
    config = configure(base, [path, "--learning_rate=2e-3", "--compile=True", "--out_dir=2024",
                              "--init_from=runs/a b", "--betas=(0.8, 0.9)"])
    assert vars(config) == {"learning_rate": 2e-3, "batch_size": 32, "compile": True, "out_dir": "2024",
                            "init_from": "runs/a b", "betas": (0.8, 0.9)}
    assert config.batch_size == 32 and base["batch_size"] == 8  # a new object; the defaults are not touched
    assert "_micro" not in vars(config) and "math" not in vars(config)  # helpers and imports are not settings
    assert "IGNORE" not in vars(config)  # nor are constants
    json.dumps(vars(config))  # train.py saves it to out_dir/config.json
    assert configure(defaults(), [path, "--batch_size=2", path]).batch_size == 32  # later wins


def test_typo_names_closest_key(tmp_path):
    path = write(tmp_path, "batch_size = 4\nlearing_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'learing_rate' \(in {path} line 2\); "
                                          r"did you mean 'learning_rate'\?"):
        configure(defaults(), [path])
    with pytest.raises(ConfigError, match=r"'learing_rate' \(on the command line\); did you mean 'learning_rate'"):
        configure(defaults(), ["--learing_rate=1e-3"])
    with pytest.raises(ConfigError, match="valid keys: batch_size, betas, compile"):  # nothing close: list them
        configure(defaults(), ["--zzz=1"])
    with pytest.raises(ConfigError, match="unknown config key 'pi'"):  # only modules are ignored, not their names
        configure(defaults(), [write(tmp_path, "from math import pi\n")])


@pytest.mark.parametrize("argv, match", [
    (["--batch_size=8.5"], r"'batch_size' \(on the command line\) is 8.5 of type float; expected int, like the default"),
    (["--batch_size=True"], r"'batch_size' .* is True of type bool; expected int"),  # bool is not an int
    (["--learning_rate=True"], r"'learning_rate' .* of type bool; expected float"),
    (["--learning_rate=fast"], r"cannot parse 'fast' for config key 'learning_rate'"),
    (["--compile=1"], r"'compile' .* is 1 of type int; expected bool"),
    (["--compile=yes"], r"cannot parse 'yes' for config key 'compile'"),
    (["--betas=[0.8, 0.9]"], r"'betas' .* of type list; expected tuple"),
    (["--batch_size"], r"expected --key=value on the command line, got '--batch_size'"),
])
def test_wrong_type_on_command_line(argv, match):
    with pytest.raises(ConfigError, match=match):
        configure(defaults(), argv)


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "out_dir = 5\n")  # a str default rejects a number
    with pytest.raises(ConfigError, match=rf"'out_dir' \(in {path} line 1\) is 5 of type int; expected str"):
        configure(defaults(), [path])
    # a None default takes any plain value, but not code: the config must stay JSON-serialisable
    with pytest.raises(ConfigError, match="'init_from' .* expected a plain value"):
        configure(defaults(), [write(tmp_path, "init_from = print\n")])


def test_promotion_and_bools():
    config = configure(defaults(), ["--learning_rate=1", "--compile=false"])
    assert config.learning_rate == 1.0 and type(config.learning_rate) is float
    assert config.compile is False
    assert configure(defaults(), ["--compile=True"]).compile is True
    assert configure(defaults(), ["--init_from=3"]).init_from == 3  # None default: a literal if it is one


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file 'nope.py'"):
        configure(defaults(), ["nope.py"])
    with pytest.raises(ConfigError, match=r"x.py line 2: syntax error"):
        configure(defaults(), [write(tmp_path, "batch_size = 1\nbatch_size = = 2\n")])
    with pytest.raises(ConfigError, match=r"x.py line 2: NameError: name 'micro' is not defined"):
        configure(defaults(), [write(tmp_path, "batch_size = 1\nbatch_size = micro * 2\n")])
