"""config.py: one home for the defaults and choices the CLI and the library share."""

import ast
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from edgetransfer import config
from edgetransfer.cli import cli

from .conftest import run

HEAVY = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "PIL", "matplotlib", "safetensors")


def _loaded_after(code: str) -> dict:
    """Which modules a fresh interpreter holds after running `code`: ours and the heavy ones."""
    probe = (
        "import sys, json\n"
        f"{code}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY + ('edgetransfer', 'click')!r})))"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout.splitlines()[-1]))


def test_config_imports_nothing_of_ours_and_nothing_third_party():
    loaded = _loaded_after("import edgetransfer.config")
    assert loaded == {"edgetransfer", "edgetransfer.config"}
    # and by its source: only the standard library, so it cannot grow a heavy import later
    tree = ast.parse(Path(config.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", name


def test_no_command_help_imports_a_heavy_library():
    """`--help` of the group and of every command stays free of torch, numpy, onnx..."""
    code = (
        "from edgetransfer.cli import cli\n"
        "for args in [['--help']] + [[c, '--help'] for c in cli.commands]:\n"
        "    try:\n"
        "        cli(args, prog_name='edgetransfer')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
    )
    loaded = _loaded_after(code)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
    assert {m for m in loaded if m.startswith("edgetransfer")} <= {
        "edgetransfer",
        "edgetransfer.cli",
        "edgetransfer.config",
        "edgetransfer.errors",
    }


def test_every_command_help_exits_0():
    for name in cli.commands:
        res = run(name, "--help")
        assert res.exit_code == 0, (name, res.output)
        assert res.output.startswith(f"Usage: cli {name} "), name


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in cli.commands[command].params}


def _library_choices() -> dict[tuple[str, str], tuple]:
    """(command, option) -> the tuple the library checks that option's value against."""
    from edgetransfer import (
        auto,
        backbones,
        demo,
        evaluate,
        export,
        features,
        loaders,
        onnxio,
        strategies,
        train,
    )

    providers = tuple(onnxio.PROVIDERS)
    return {
        ("adapt", "strategy"): (*strategies.STRATEGIES, auto.AUTO),
        ("adapt", "head_solver"): train.SOLVERS,
        ("adapt", "augment"): loaders.AUGMENT,
        ("adapt", "backend"): features.BACKENDS,
        ("adapt", "features"): backbones.FEATURES,
        ("export", "exporter"): ("auto", *export.EXPORTERS),
        ("evaluate", "split"): evaluate.SPLITS,
        ("predict", "provider"): providers,
        ("evaluate", "provider"): providers,
        ("bench", "provider"): providers,
        ("demo", "source"): demo.SOURCES,
    }


def test_cli_choices_are_the_library_choices():
    expected = _library_choices()
    seen = set()
    for command in cli.commands:
        for name, p in _params(command).items():
            if isinstance(p.type, click.Choice):
                # a new choice option must be added here, with the tuple the library checks
                assert (command, name) in expected, f"{command} --{name}: which library tuple?"
                assert tuple(p.type.choices) == tuple(expected[command, name]), (command, name)
                seen.add((command, name))
    assert seen == set(expected)


def test_config_tuples_are_the_registries():
    from edgetransfer import onnxio

    assert tuple(onnxio.PROVIDERS) == config.PROVIDERS  # a dict: cannot be derived from config
    assert config.PROVIDER in config.PROVIDERS
    assert config.STRATEGY in config.STRATEGIES
    assert set(config.AUTO_CANDIDATES) <= set(config.STRATEGIES)
    assert config.HEAD_SOLVER in config.SOLVERS
    assert config.BACKEND in config.BACKENDS
    assert config.FEATURE in config.FEATURES
    assert config.EXPORTER in config.EXPORTER_CHOICES
    assert config.SPLIT in config.SPLITS


def test_every_strategy_name_is_a_strategy():
    """Each name in config.STRATEGIES is handled by strategies.apply; others are refused."""
    from edgetransfer import strategies
    from edgetransfer.backbones import block_modules, get_arch, split
    from edgetransfer.errors import EdgeTransferError

    spec = get_arch("simple_cnn")
    trainable = {}
    for name in config.STRATEGIES:
        features, _ = split(spec, spec.build(5))
        blocks = block_modules(spec, features, None)
        plan = strategies.apply(strategies.StrategyConfig(name), features, blocks)
        trainable[name] = sum(p.numel() for p in plan.trainable)
    assert trainable.pop("head") == 0 and all(trainable.values())
    with pytest.raises(EdgeTransferError) as e:
        strategies.check(strategies.StrategyConfig("lora"))
    assert str(e.value) == "unknown strategy 'lora'; choose one of: " + ", ".join(config.STRATEGIES)


def test_every_augment_name_is_a_preset():
    from edgetransfer.loaders import train_transform
    from edgetransfer.manifest import Preprocessing

    p = Preprocessing(input_size=(32, 32), resize=36, mean=(0.5,) * 3, std=(0.5,) * 3)
    for preset in config.AUGMENTS:
        assert callable(train_transform(p, preset))
    with pytest.raises(ValueError, match="unknown augmentation preset 'wild'"):
        train_transform(p, "wild")


def _field_defaults(cls) -> dict:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _signature_defaults(fn) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_cli_defaults_are_the_library_defaults():
    """Every option named like a field or parameter of the library call behind its command has
    that field's default (export shows --max-drop in points, the library takes a fraction)."""
    from edgetransfer import report, runtime
    from edgetransfer.adapt import AdaptConfig
    from edgetransfer.auto import AutoConfig
    from edgetransfer.bench import BenchConfig
    from edgetransfer.evaluate import evaluate
    from edgetransfer.export import ExportConfig
    from edgetransfer.verify import verify

    library = {
        "adapt": {**_field_defaults(AdaptConfig), **_field_defaults(AutoConfig)},
        "export": {**_field_defaults(ExportConfig), "max_drop": ExportConfig.max_drop * 100},
        "bench": _field_defaults(BenchConfig),
        "verify": _signature_defaults(verify),
        "evaluate": {**_signature_defaults(evaluate), "mistakes": report.MISTAKES},
        "predict": {
            **_signature_defaults(runtime.load_predictor),
            "batch_size": _signature_defaults(runtime.Predictor.predict)["batch_size"],
        },
    }
    compared = 0
    for command, defaults in library.items():
        ctx = click.Context(cli.commands[command])
        for name, p in _params(command).items():
            if name in defaults and not isinstance(p, click.Argument):
                shown = p.get_default(ctx)
                assert shown == defaults[name], (command, name, shown, defaults[name])
                compared += 1
    assert compared >= 60  # the matching by name really matched (62 today)


def test_adapt_help_shows_the_adaptconfig_defaults():
    from edgetransfer.adapt import AdaptConfig

    text = run("adapt", "--help", terminal_width=200, max_content_width=200).output
    shown, flag = {}, None
    for line in text.splitlines():
        start = re.match(r"  (--[a-z0-9-]+)", line)  # an option's first line; deeper: its help
        flag = start.group(1) if start else flag
        default = re.search(r"\[default: ([^;\]]+)", line)
        if flag and default:
            shown[flag] = default.group(1)
    flags = {"backbone_lr_mult": "--backbone-lr"}
    checked = 0
    for name, default in _field_defaults(AdaptConfig).items():
        if default is None:
            continue  # the help says in words what None means (e.g. --augment, --max-pixels)
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if flag in shown:
            assert shown[flag] == str(default), (flag, shown[flag], default)
            checked += 1
    assert checked >= 20, shown  # 21 today
    assert shown["--epochs"] == str(AdaptConfig.epochs) == "30"
    assert shown["--strategy"] == "head" and shown["--head-solver"] == "lbfgs"


def test_global_max_pixels_help_shows_the_decoder_default():
    from edgetransfer.data import DEFAULT_MAX_PIXELS

    assert f"[default: {DEFAULT_MAX_PIXELS};" in run("--help").output.replace("\n  ", " ")


SHARED = ("as_json", "quiet", "force", "batch_size", "threads", "provider")


def test_shared_options_are_the_same_option_everywhere():
    """--json, --quiet, --force, --batch-size, --threads and --provider come from one decorator
    each: the same flags, type and kind on every command (only help and defaults may differ)."""
    found: dict[str, list] = {name: [] for name in SHARED}
    for command in cli.commands:
        for name, p in _params(command).items():
            if name in found:
                found[name].append((command, p))
    for name, uses in found.items():
        assert len(uses) >= 3, name  # shared by several commands
        first = uses[0][1]
        for command, p in uses[1:]:
            assert (p.opts, p.secondary_opts, p.is_flag) == (
                first.opts,
                first.secondary_opts,
                first.is_flag,
            ), (name, command)
            assert repr(p.type) == repr(first.type), (name, command)
    quiet_help = {p.help for _, p in found["quiet"]}
    assert quiet_help == {"No progress bars."}
    assert all(p.help for _, p in found["as_json"])  # every --json says what it prints
