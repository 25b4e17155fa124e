"""train.py's command line: flags derived from `TrainConfig`'s fields, `--config FILE`, and parsing.

`parse_train_args` derives the flags from the fields (the original project's names as aliases), reads
`--config FILE` (YAML or JSON, the same keys), checks each value's type like a flag's, and validates the
result. Precedence: defaults < config file < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path

from .config import TrainConfig
from .errors import ArgumentParser, UserInputError, first_line

#: Options that hold paths: a config file's `~` in them is expanded, as the shell does for a flag's.
PATH_FIELDS = ("train_data", "output_dir", "resume_from_checkpoint", "model_config")

# Original flags whose meaning needs more than a rename (the renames are the fields' `alias`es).
_ORIGINAL_MODE_HELP = "original project's --mode: only 'train' is accepted here; sample with sample.py"


def _is_optional(tp) -> bool:
    """`int | None` -> True; `int` -> False."""
    is_union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return is_union and type(None) in typing.get_args(tp)


def _base_type(tp) -> type:
    """`int | None` -> int; `str` -> str."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


#: Words that mean "no value" for an optional setting, on the command line and in config files alike.
NONE_WORDS = ("none", "null")


def _none_or(conv):
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else conv(text)
    parse.__name__ = conv.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The train.py flags, derived from `TrainConfig`; every default is SUPPRESSed so that config
    files can sit between the defaults and the command line."""
    parser = ArgumentParser(
        prog="train.py", description="Train a latent diffusion model (AdvancedUNet2DModel + DDPM) on latents.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file with any of the options below (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp, meta = _base_type(hints[f.name]), f.metadata
        names = [f"--{f.name}"] + ([meta["alias"]] if "alias" in meta else [])
        # a help text that explains its default itself ("default: when it fits") is not given a second one
        help_text = meta["help"] if "default" in meta["help"] else f"{meta['help']} (default: {f.default})"
        if meta.get("choices"):  # listed here, not as argparse choices: the config file's values are checked too
            help_text += f"; one of {', '.join(meta['choices'])}"
        if tp is bool:  # a --no_ switch where the default is not already off: True, or None (chosen by the run)
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                help=argparse.SUPPRESS if f.default is False else f"turn --{f.name} off")
        else:
            conv = _none_or(tp) if _is_optional(hints[f.name]) else tp  # "none" means None only where None is valid
            parser.add_argument(*names, dest=f.name, type=conv, choices=None, help=help_text,
                                metavar=tp.__name__.upper())
    parser.add_argument("--mode", choices=("train",), help=_ORIGINAL_MODE_HELP)
    return parser


#: A YAML 1.1 integer with a leading zero, which PyYAML reads as octal (`seed: 042` is 34).
_OCTAL_INT = re.compile(r"[-+]?0[0-7_]+")


class _OctalInt(ValueError):
    """A config file's integer written with a leading zero (see `_OCTAL_INT`)."""


def _yaml_loader():
    """PyYAML's safe loader, refusing a leading-zero integer that it would silently read as another number."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_yaml_int(self, node):
            value = super().construct_yaml_int(node)
            if _OCTAL_INT.fullmatch(node.value) and value != (meant := int(node.value.replace("_", ""), 10)):
                raise _OctalInt(f"line {node.start_mark.line + 1}: YAML reads {node.value} as the octal number "
                                f"{value}; write {meant} (no leading zero), or \"{node.value}\" in quotes for a "
                                "text setting")
            return value

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    return Loader


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON config file of `TrainConfig` keys."""
    import yaml

    file = Path(path)
    if file.is_dir():
        raise UserInputError(f"--config: {path} is a folder; name a YAML or JSON file")
    if not file.exists():
        raise UserInputError(f"--config: {path} does not exist")
    try:
        data = yaml.load(file.read_text(), Loader=_yaml_loader())  # YAML is a superset of JSON; pipes read too
    except _OctalInt as err:
        raise UserInputError(f"--config: {path} {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserInputError(f"--config: {path} is not valid YAML/JSON ({first_line(err)})") from None
    except OSError as err:
        raise UserInputError(f"--config: cannot read {path} ({err.strerror or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"--config: {path} must hold a mapping of option names to values")
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - valid, key=str)  # a stray numeric key too
    if unknown:
        raise UserInputError(f"--config: {path} has unknown keys {unknown}; see `python train.py --help`")
    return data


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and `--config FILE`) -> a validated `TrainConfig`. Bad input raises `UserInputError`."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("mode", None)
    values = load_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    hints = typing.get_type_hints(TrainConfig)
    for name, value in list(values.items()):  # config files give YAML types; check them like flags
        tp = _base_type(hints[name])
        if name == "model_config" and isinstance(value, dict):  # a nested mapping in the file: the same JSON
            try:
                values[name] = value = json.dumps(value)
            except (TypeError, ValueError) as err:  # a YAML date or set has no JSON form
                raise UserInputError(f"--model_config: {first_line(err)}; give numbers, strings, booleans, "
                                     "lists and mappings") from None
        if name in PATH_FIELDS and isinstance(value, str) and name not in args:  # as a shell expands a flag's ~
            values[name] = value = os.path.expanduser(value)
        if isinstance(value, str) and value.lower() in NONE_WORDS and _is_optional(hints[name]):
            values[name] = value = None  # as on the command line
        if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                values[name] = value = float(value)
            except ValueError:
                pass
        if value is None and not _is_optional(hints[name]):
            raise UserInputError(f"--{name}: needs a value, got none")
        if isinstance(value, bool) and tp is not bool:
            quote = " (YAML reads an unquoted no/yes/on/off as a boolean: quote it)" if tp is str else ""
            raise UserInputError(f"--{name}: expected {tp.__name__}, got {value!r}{quote}")
        if value is None or isinstance(value, tp) or (tp is float and isinstance(value, int)):
            continue
        raise UserInputError(f"--{name}: expected {tp.__name__}, got {value!r}")
    # Given (on the command line, or a file's own value: a saved train/config.json holds the default), not the default.
    warmup_given = "lr_warmup_steps" in args or values.get("lr_warmup_steps") != TrainConfig.lr_warmup_steps
    if warmup_given and values.get("lr_warmup_steps") and values.get("lr_scheduler") == "constant":
        raise UserInputError(f"--lr_warmup_steps {values['lr_warmup_steps']}: --lr_scheduler constant has no "
                             "warm-up; use --lr_scheduler constant_with_warmup, or drop --lr_warmup_steps")
    return TrainConfig(**values).validate()
