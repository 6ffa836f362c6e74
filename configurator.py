"""
Options, the same way for every script, nanoGPT style:

    python train.py config/shakespeare_moe.py --batch_size=32 --compile
    python sample.py --start "Before we proceed" --temperature=0

A script's keys are its defaults (the commented assignments at its top). `--key=value` and `--key value`
set one; a value is parsed with ast.literal_eval (a plain string if that fails) and must have the
default's type; a bare `--flag` sets a True/False key to True. train.py also takes config files: plain
Python exec'd over the defaults, which may only set existing keys (names starting with _ are a file's own
helpers). Then every key is checked against the script's allowed values. Any mistake is one line on
stderr and exit status 2, never a traceback; --help lists the keys, their defaults and what each does.
"""
import ast
import dataclasses
import difflib
import math
import os
import re
import sys
import types

from common import fail


def at_least(low):
    return lambda v: v >= low, f"at least {low}"


def above(low):
    return lambda v: v > low, f"above {low}"


def between(low, high, open_low=False, open_high=False):
    """low <= v <= high; open_low and open_high leave out low and high."""
    return (lambda v: (v > low if open_low else v >= low) and (v < high if open_high else v <= high)), \
        f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def one_of(*allowed):
    return lambda v: v in allowed, f"one of {', '.join(map(str, allowed))}"


def finite(v):
    return not isinstance(v, float) or math.isfinite(v)


def refusal(key, value, allowed):
    """The one line that refuses a value: the key, the value, what the key may be."""
    return f"{key}={value!r} is not allowed: {key} must be {allowed}"


def first_refusal(config, rules):
    """The refusal of the first key of config whose value its rule refuses, or None."""
    return next((refusal(key, config[key], allowed) for key, (ok, allowed) in rules.items()
                 if key in config and not (finite(config[key]) and ok(config[key]))), None)


def check(config, rules):
    """Fail on the first key whose value its rule refuses: one line with the key, the value, what is allowed."""
    line = first_refusal(config, rules)
    if line:
        fail(line)


def _comments(sources):
    """{key: its one-line comment} from `key = value  # comment` lines of the sources (or a dataclass field's
    `key: type = value`, or a dict's `'key': value,`)."""
    found = {}
    for path in sources:
        with open(path, encoding='utf-8') as f:
            for m in re.finditer(r'^\s*[\'"]?(\w+)[\'"]?\s*(?::\s*\w+\s*=|=|:).*?#\s*(.+)$', f.read(), re.M):
                found.setdefault(m[1], m[2].strip())
    return found


def _check_type(defaults, key, value, where):
    """Return value as the type of defaults[key], or fail with a suggestion."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3)
        hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "see --help for the keys"
        fail(f"unknown option '{key}' ({where}): {hint}")
    want = type(defaults[key])
    if type(value) is want:
        return value
    if want is float and type(value) is int:  # --learning_rate=1 means 1.0
        return float(value)
    fail(f"{key} must be {want.__name__} like {defaults[key]!r}, got {value!r} ({where})")


def _parse(text, default):
    if isinstance(default, str):
        return text  # --out_dir=2024 is a name, not a number
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # then the type check names what was expected


def _exec_file(config, explicit, defaults, path):
    """Apply a config file: what it assigns (even to the default's value), or changes through code it runs."""
    if not os.path.isfile(path):
        fail(f"config file '{path}' not found (usage: python train.py [config/file.py] [--key=value ...])")
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        scope = {**config, '__file__': path}  # a config can build on another next to it
        exec(compile(tree, path, 'exec'), scope)
    except Exception as e:  # a user's config file: report it in one line
        fail(f"config file '{path}' failed: {type(e).__name__}: {e}")
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assigned |= {k for k, v in scope.items() if k not in config or v is not config[k]}
    for key in sorted(assigned & scope.keys()):
        if key.startswith('_') or isinstance(scope[key], (types.ModuleType, types.FunctionType)):
            continue  # helpers: _width = 64, import math
        config[key] = _check_type(defaults, key, scope[key], path)
        explicit[key] = path


def configure(defaults, argv, doc='', sources=(), rules=None, positional=None):
    """Apply argv to a copy of defaults. positional: the key a bare first argument sets (prepare.py's dataset,
    convert.py's command); without it bare arguments are config files. sources: the files whose comments
    --help shows. Returns (config, explicit): the resolved dict, and {key: where the user set it} for the keys
    the user set: the command-line argument ('--key=value'), or the config file's path."""
    config, explicit, args = dict(defaults), {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg in ('-h', '--help'):
            notes = _comments(sources)
            print(doc.strip() + '\n\noptions (default, what it does):')
            print('\n'.join(f"  --{k}={v!r}  {notes.get(k, '')}".rstrip() for k, v in defaults.items()))
            sys.exit(0)
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq and isinstance(defaults.get(key), bool):
                text = 'True'  # a bare --flag
            elif not eq:
                if not args:
                    fail(f"--{key} needs a value: --{key}=VALUE")
                text = args.pop(0)
            config[key] = _check_type(defaults, key, _parse(text, defaults.get(key)), arg)
            explicit[key] = f"--{key}={text}"
        elif positional and positional not in explicit:
            config[positional] = arg
            explicit[positional] = arg
        elif positional:
            fail(f"unexpected argument {arg!r}: options are --key=value (see --help)")
        else:
            _exec_file(config, explicit, defaults, arg)
    check(config, rules or {})
    return config, explicit


def field_defaults(cls):
    """{field: default} of a dataclass (a default_factory called): the keys its fields add to a script's."""
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


def script_defaults(path):
    """{key: default} of a script's options, its top-level `key = literal` assignments (lowercase names), read
    without running it: what bench.py needs of train.py's keys to read config files as train.py does."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if name.islower() and not name.startswith('_') and isinstance(value, (int, float, bool, str)):
                found[name] = value
    return found
