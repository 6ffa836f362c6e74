"""
Configuration for train.py and train_ddp.py, nanoGPT style:

    python train.py config/shakespeare_moe.py --batch_size=32 --compile=True

A config file is plain Python, exec'd over the defaults. Each --key=value is parsed with
ast.literal_eval (a plain string if that fails). Both may only set existing keys, to a value of the
default's type (names starting with _ are a config file's own helpers).
Any mistake is one line on stderr and exit status 2, never a traceback.
"""
import ast
import difflib
import os
import sys
import types


def fail(msg):
    """Bad input: one clear line, exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _check(defaults, key, value, where):
    """Return value as the type of defaults[key], or fail with a suggestion."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see the defaults at the top of train.py"
        fail(f"unknown config key '{key}' ({where}): {hint}")
    want = type(defaults[key])
    if type(value) is want:
        return value
    if want is float and type(value) is int:  # --learning_rate=1 means 1.0
        return float(value)
    fail(f"{key} must be {want.__name__} like {defaults[key]!r}, got {value!r} ({where})")


def configure(defaults, argv):
    """Apply config files and --key=value overrides in argv to a copy of defaults.
    Returns (config, explicit): the resolved dict and the set of keys the user set."""
    config, explicit = dict(defaults), set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\nkeys and defaults:")
            print("\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                fail(f"expected --key=value, got '{arg}'")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # --dataset=shakespeare, --device=cuda:1
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # --out_dir=2024 is a name, not a number
            config[key] = _check(defaults, key, value, arg)
            explicit.add(key)
        else:
            if not os.path.isfile(arg):
                fail(f"config file '{arg}' not found (usage: python train.py [config/file.py] [--key=value ...])")
            try:
                with open(arg) as f:
                    tree = ast.parse(f.read(), arg)
                scope = {**config, "__file__": arg}  # a config can build on another next to it
                exec(compile(tree, arg, "exec"), scope)
            except Exception as e:  # a user's config file: report it in one line
                fail(f"config file '{arg}' failed: {type(e).__name__}: {e}")
            # what the file assigns (even to the default's value), or changes through code it runs
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            assigned |= {k for k, v in scope.items() if k not in config or v is not config[k]}
            for key in sorted(assigned & scope.keys()):
                if key.startswith("_") or isinstance(scope[key], (types.ModuleType, types.FunctionType)):
                    continue  # helpers: _width = 64, import math
                config[key] = _check(defaults, key, scope[key], arg)
                explicit.add(key)
    return config, explicit
