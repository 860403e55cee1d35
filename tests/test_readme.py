"""The README's code works: every ```python block runs, every ```bash command is checked.

Python blocks run by default, each in a fresh namespace with a temporary working directory.
A block that uses names it does not define (a snippet out of a larger program) gets them from
``SETUP``; a block that cannot run here is listed in ``SKIP`` with the reason. Both are keyed
by a piece of the block's text, and a key that matches no block, or more than one, fails, so
the lists cannot go stale: a new block runs unless someone writes down why not.

Bash blocks are not run (they install packages, train for minutes, or need files that are not
here); every command in them is checked instead: ``main.py`` commands name an existing
``--config=`` file, existing ``--config.x.y=`` fields with values of the field's type, and flags
main.py defines (enum values included); ``python -m proxy_jax.…`` commands parse with the
module's own argument parser (choices included); ``-r`` requirement files exist. Inline
``--config.x.y`` mentions in the prose name existing fields too.
"""
import argparse
import ast
import importlib.util
import os
import re
import shlex
import sys

import ml_collections
import numpy as np
import pytest

from proxy_jax import config_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")


def _blocks(language):
    """[(first line number, code)] of the README's ```language blocks."""
    blocks, current, start = [], None, 0
    with open(README, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = line.strip()
            if current is None and fence == f"```{language}":
                current, start = [], number + 1
            elif current is not None and fence == "```":
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    assert current is None, f"README.md: unclosed ```{language} block at line {start}"
    return blocks


# ----------------------------------------------------------------------------- python blocks

# A piece of the block's text -> why it does not run here.
SKIP = {
    'load_pretrained(variables, "weights/resnet50.npz"':
        "needs an ImageNet weight file converted from a PyTorch download (and `images`)",
    "TfdsDataset('cars196', 'train', download=True)":
        "downloads Cars196 through tensorflow-datasets (no network in the tests)",
}

_CARDB = """
from proxy_jax.data import embedded as _embedded
_embedded.ensure_embedded_dataset({root!r}, num_train_classes={train}, num_test_classes=2,
                                  images_per_class=4, image_size=16)
"""

# A piece of the block's text -> code run before it (the names the snippet takes as given).
SETUP = {
    "order = neighbour_swaps(labels)": """
import jax, jax.numpy as jnp
key = jax.random.PRNGKey(0)
embeddings = jax.random.normal(jax.random.PRNGKey(1), (32, 64))
labels = jnp.arange(32) // 2          # same-class pairs (2i, 2i+1), as EE needs
proxies = jax.random.normal(jax.random.PRNGKey(2), (16, 64))
""",
    "memory = memvir_init(num_steps=45": """
import jax, jax.numpy as jnp
import flax.linen as nn
model = nn.Dense(512)
images = jax.random.normal(jax.random.PRNGKey(1), (128, 8))
labels = jnp.arange(128) % 98
params = {'model': model.init(jax.random.PRNGKey(0), images),
          'proxies': jax.random.normal(jax.random.PRNGKey(2), (98, 512))}
epoch, warm_epoch = 1, 0
""",
    "cfg = DadaConfig(": """
import jax, jax.numpy as jnp
B, C = 16, 8
key, k2 = jax.random.split(jax.random.PRNGKey(0))
emb = jax.random.normal(jax.random.PRNGKey(1), (B, 32))
labels = jnp.arange(B) // 2           # B // 2 classes of two samples: the positive pairs
proxies = jax.random.normal(jax.random.PRNGKey(2), (C, 32))
""",
    "m = retrieval_metrics(emb, labels": """
import numpy as np
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(20), 10)
emb = rng.normal(size=(200, 32)).astype(np.float32) + 2 * rng.normal(size=(20, 32))[labels]
q, q_labels, g, g_labels = emb[::2], labels[::2], emb[1::2], labels[1::2]
""",
    "load_benchmark('dataset/carDB', 'train')": _CARDB.format(root="dataset/carDB", train=2),
    # ClassBalancedSampler(n_instance=4) with batch 120 needs 30 training classes.
    'ImageFolder("carDB/train")': _CARDB.format(root="carDB", train=30),
}

# A piece of the block's text -> code run after it (resources the snippet leaves open).
TEARDOWN = {'ImageFolder("carDB/train")': "loader.close()"}


def _entry(table, code):
    keys = [k for k in table if k in code]
    assert len(keys) <= 1, f"several entries match one block: {keys}"
    return table[keys[0]] if keys else None


PYTHON_BLOCKS = _blocks("python")


def test_exclusions_and_setups_each_match_one_block():
    for table in (SKIP, SETUP, TEARDOWN):
        for key in table:
            matches = [line for line, code in PYTHON_BLOCKS if key in code]
            assert len(matches) == 1, f"{key!r} matches the README python blocks at lines {matches}"
    assert not set(SKIP) & set(SETUP)


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS,
                         ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    reason = _entry(SKIP, code)
    if reason is not None:
        pytest.skip(f"README.md line {line}: {reason}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_line_{line}"}
    setup = _entry(SETUP, code)
    if setup is not None:
        exec(compile(setup, f"<setup of README.md:{line}>", "exec"), namespace)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        teardown = _entry(TEARDOWN, code)
        if teardown is not None and "loader" in namespace:
            exec(teardown, namespace)
    if "losses.norm_softmax, argnums=(0, 2)" in code:   # 'Losses in your own JAX code'
        # Embeddings and proxies are different draws, so the loss means something (not 0).
        assert "emb" in namespace and "proxies" in namespace
        assert not np.allclose(namespace["emb"][:1], namespace["proxies"][:1])
        assert float(namespace["loss"]) > 0.1 and np.isfinite(float(namespace["loss_ps"]))


# ----------------------------------------------------------------------------- bash blocks

def _commands(code):
    """Shell commands of a bash block: continuations joined, comments dropped, split at && and ;."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for line in joined.splitlines():
        tokens = [re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARIABLES.get(m[1], m[0]), t)
                  for t in shlex.split(line, comments=True)]
        command = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";", "||"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def _main_flags():
    """{flag name: enum values or None, 'bool' for booleans} defined in main.py."""
    with open(os.path.join(REPO, "main.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    flags = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("DEFINE_") and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            kind = node.func.attr[len("DEFINE_"):]
            values = None
            if kind == "enum" and len(node.args) > 2 and isinstance(node.args[2], ast.List):
                values = [e.value for e in node.args[2].elts]
            flags[node.args[0].value] = "bool" if kind in ("bool", "boolean") else values
    return flags


def _field(config, path):
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return KeyError(path)
        node = node[part]
    return node


def _check_config_override(config, source, path, value):
    current = _field(config, path)
    assert not isinstance(current, KeyError), f"--config.{path}: no such field in {source}"
    if value is None or isinstance(current, ml_collections.ConfigDict):
        return
    if isinstance(current, bool):
        assert value.lower() in ("true", "false"), f"--config.{path}={value}: not a bool"
    elif isinstance(current, int):
        int(value)
    elif isinstance(current, float):
        float(value)


def _check_main_command(args):
    flags = _main_flags()
    config_file = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config_file is None or config_file == "...":   # '...' is the README's placeholder
        config_file = DEFAULT_CONFIG
    else:
        assert os.path.isfile(os.path.join(REPO, config_file)), f"{config_file} does not exist"
        config_file = os.path.join(REPO, config_file)
    config = config_utils.load_config_file(config_file)
    for arg in args:
        assert arg.startswith("--"), f"main.py takes flags only, got {arg!r}"
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            _check_config_override(
                config, os.path.relpath(config_file, REPO), name[len("config.") :], value
            )
        elif name != "config":
            bare = name[2:] if name.startswith("no") and flags.get(name[2:]) == "bool" else name
            assert bare in flags, f"--{name} is not a flag of main.py ({sorted(flags)})"
            if isinstance(flags[bare], list):
                assert value in flags[bare], f"--{name}={value}: not one of {flags[bare]}"


class _Parsed(Exception):
    pass


def _check_module_command(module, args, monkeypatch):
    """Parses args with the module's argparse parser (its main is stopped right after)."""
    import importlib
    main = importlib.import_module(module).main
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        parse_args(self, argv, namespace)   # a bad flag or choice exits here (SystemExit 2)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        with pytest.raises(_Parsed):
            main(args)


# Commands whose program the checks above do not cover, and why that is fine.
NOT_CHECKED = {
    "python3": "creates the virtual environment",
    "tensorboard": "a separate tool",
    "sbatch": "Slurm's submit command (the script it submits is its own block)",
}

# Shell variables the commands use, set as the launcher would.
SHELL_VARIABLES = {"SLURM_ARRAY_TASK_ID": "0"}

BASH_BLOCKS = _blocks("bash")


@pytest.mark.parametrize("line,code", BASH_BLOCKS, ids=[f"line{line}" for line, _ in BASH_BLOCKS])
def test_bash_block_commands_name_what_exists(line, code, monkeypatch):
    checked = 0
    for command in _commands(code):
        while command and re.match(r"^[A-Z_][A-Z0-9_]*=", command[0]):  # VAR=value prefixes
            command = command[1:]
        if command[0] == "srun":        # Slurm's launcher: the rest is the command
            command = command[1:]
        wrapped = [t[len("--wrap="):] for t in command if t.startswith("--wrap=")]
        if command[0] == "sbatch" and wrapped:  # Slurm's submit of a command line
            command = shlex.split(wrapped[0])
        program = os.path.basename(command[0])
        if program in ("pip", "pip3"):
            for i, token in enumerate(command):
                if token == "-r":
                    assert os.path.isfile(os.path.join(REPO, command[i + 1])), command[i + 1]
            checked += 1
        elif program in ("python", "python3") and len(command) > 1 and command[1] == "main.py":
            _check_main_command(command[2:])
            checked += 1
        elif program in ("python", "python3") and command[1:2] == ["-m"]:
            module = command[2]
            if module.startswith("proxy_jax"):
                _check_module_command(module, command[3:], monkeypatch)
            elif module == "pytest":
                assert all(os.path.exists(os.path.join(REPO, a)) for a in command[3:]
                           if not a.startswith("-") and not a.isdigit())
            elif module != "venv":
                pytest.fail(f"README.md line {line}: no check for `python -m {module}`")
            checked += 1
        elif program == "bash" and len(command) > 1:  # a script of the repository
            assert os.path.isfile(os.path.join(REPO, command[1])), f"line {line}: {command[1]}"
            if command[1] == "bench/gpu_check.sh":  # its flags are gpu_check.py's
                monkeypatch.setattr(sys, "path", list(sys.path))  # the module extends it
                spec = importlib.util.spec_from_file_location(
                    "gpu_check", os.path.join(REPO, "bench", "gpu_check.py"))
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                module.parse_args(command[2:])
            checked += 1
        else:
            assert program in NOT_CHECKED, f"README.md line {line}: no check for {command}"
    assert checked, f"README.md line {line}: nothing checked"


# Inline mentions that are wrong on purpose.
INLINE_EXCEPTIONS = {"--config.data.batchsize=32": "the README's example of an unknown field"}


def test_inline_config_fields_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    mentions = re.findall(r"`[^`\n]*`", text)
    config = config_utils.load_config_file(DEFAULT_CONFIG)
    seen = 0
    for span in mentions:
        for token in span.strip("`").split():
            if token.startswith("--config.") and token not in INLINE_EXCEPTIONS:
                path, _, value = token[len("--config."):].partition("=")
                _check_config_override(config, "configs/default.py", path, value or None)
                seen += 1
            elif token.startswith("--config=configs/"):
                assert os.path.isfile(os.path.join(REPO, token.split("=", 1)[1])), token
    assert seen and all(k in text for k in INLINE_EXCEPTIONS)
    assert isinstance(_field(config, "data.batchsize"), KeyError)   # still wrong, as the text says
