"""nanoGPT-style configuration that refuses typos.

train.py declares its defaults as module-level assignments (one comment each: the defaults are the
docs), collects them once with `DEFAULTS = defaults(vars())`, and `main` calls
`configure(DEFAULTS, sys.argv[1:])`, which returns the settings as a `Config`: an object the
training functions receive explicitly (`c.batch_size`); nothing is written back into any module.
Every argument is applied in order:
- `config/x.py` is executed as plain Python in a fresh namespace. A name it leaves behind is a setting
  if it is a default's key. Names starting with `_` (helpers: `_micro = 8; batch_size = _micro * 4`) and
  imported modules are ignored; any other name is an error, so a typo cannot silently do nothing.
- `--key=value` is parsed with `ast.literal_eval`; a str default takes the text as is
  (`--out_dir=2024` is the string '2024'), a None default falls back to the text if it is not a literal,
  and a bool default accepts True/False/true/false.
Every value must have its default's type: an int is promoted to float, bool is not an int, a None
default accepts any plain value. The defaults are the names that neither start with `_` nor are
UPPER_CASE constants (an imported IGNORE = -100 is not a setting) and whose value is plain (bool, int,
float, str, list, tuple, dict or None). A Config is JSON-serialisable through `vars(c)`.
"""

import ast
import difflib
import types

SETTING_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


class ConfigError(ValueError):
    """A bad config file or command-line override; the message is one line meant for the user."""


class Config(types.SimpleNamespace):
    """The settings of one run, as attributes."""


def defaults(scope: dict) -> dict:
    """The settings among a module's names (see the module docstring), with their default values."""
    return {k: v for k, v in scope.items() if not k.startswith("_") and not k.isupper() and isinstance(v, SETTING_TYPES)}


def configure(defaults: dict, argv: list[str]) -> Config:
    """Apply config files and --key=value overrides from argv to the defaults; return the settings."""
    config = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"expected --key=value on the command line, got {arg!r}")
            where = "on the command line"
            _check_known(key, defaults, where)
            config[key] = _check_type(key, _parse(key, text, defaults[key], where), defaults[key], where)
        else:
            for key, (value, where) in _run_file(arg).items():
                _check_known(key, defaults, where)
                config[key] = _check_type(key, value, defaults[key], where)
    return Config(**config)


def _run_file(path: str) -> dict:
    """Execute a config file; return {name: (value, 'in path line N')} for the names it leaves behind."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from None
    try:
        tree = ast.parse(source, filename=path)
        namespace = {}
        exec(compile(tree, path, "exec"), namespace)
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # the file is user code: report where it failed, not a traceback into configure
        tb = e.__traceback__
        while tb.tb_next is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        raise ConfigError(f"{path} line {tb.tb_lineno}: {type(e).__name__}: {e}") from None
    last_line = {}  # the last assignment is the one that counts
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            last_line[node.id] = max(node.lineno, last_line.get(node.id, 0))
    return {
        name: (value, f"in {path} line {last_line.get(name, '?')}")
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def _check_known(key: str, defaults: dict, where: str) -> None:
    if key in defaults:
        return
    close = difflib.get_close_matches(key, defaults, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(defaults))}"
    raise ConfigError(f"unknown config key {key!r} ({where}); {hint}")


def _parse(key: str, text: str, default, where: str):
    if isinstance(default, str):
        return text
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise ConfigError(f"cannot parse {text!r} for config key {key!r} ({where}); "
                          f"expected {type(default).__name__}, like the default {default!r}") from None


def _check_type(key: str, value, default, where: str):
    if default is None and isinstance(value, SETTING_TYPES):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if default is not None and type(value) is type(default):
        return value
    expected = "a plain value (bool, int, float, str, list, tuple, dict or None)" if default is None \
        else f"{type(default).__name__}, like the default {default!r}"
    raise ConfigError(f"config key {key!r} ({where}) is {value!r} of type {type(value).__name__}; "
                      f"expected {expected}")
