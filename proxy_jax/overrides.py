"""Config overrides given as text (``FIELD=VALUE``), checked against a locked config.

What a sweep and a search share: the parse of ``--grid``-style values, the check of an
override against its config (unknown field, wrong type, value out of range) with one line
naming it, the folder name of a set of overrides, and whether a run's folder is complete.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from typing import Sequence

import ml_collections

from proxy_jax import config_utils

__all__ = ["SweepError", "split_values", "key_value", "folder_part", "run_config",
           "run_status"]


class SweepError(ValueError):
    """A bad sweep flag or override; the message is the one line the command prints."""


def split_values(text: str) -> list[str]:
    """``'0.2,0.4'`` → ``['0.2', '0.4']``; commas inside brackets stay: ``'(1,2),(4,)'`` →
    ``['(1,2)', '(4,)']``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current]]


def key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    if not sep or not key:
        raise SweepError(f"{flag} {text!r}: expected FIELD=VALUE (e.g. loss.scale=16)")
    return key, value.strip()


def folder_part(key: str, value: str) -> str:
    """``key=value`` with anything but letters, digits and ``._+=-`` made ``-``."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", f"{key}={value}")


def _parse_value(current, text: str, path: str):
    """``text`` as the type of the field's ``current`` value (what ``--config.x=`` gives)."""
    def bad(what):
        return SweepError(f"config.{path}={text}: not {what} (the field holds {current!r})")

    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise bad("a bool (true or false)")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a float") from None
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise bad("a tuple, e.g. (1,2,4)") from None
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return text


def run_config(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]], *,
               source: str) -> ml_collections.ConfigDict:
    """A copy of the locked ``config`` with ``overrides`` applied and validated.

    Raises:
      SweepError: naming the override: an unknown field (with the closest fields), a value
        that is not of the field's type, or a value ``config_utils.validate`` refuses.
    """
    config = copy.deepcopy(config)
    for path, text in overrides:
        message = config_utils.unknown_field_message(config, path, source=source)
        if message is not None:
            raise SweepError(message)
        current = config
        for part in path.split("."):
            current = current[part]
        if isinstance(current, ml_collections.ConfigDict):
            raise SweepError(f"config.{path} is a section, not a field; set its fields")
        value = _parse_value(current, text, path)
        try:
            config.update_from_flattened_dict({path: value})
        except (TypeError, ValueError, KeyError) as error:
            raise SweepError(f"config.{path}={text}: {error}") from None
    try:
        config_utils.validate(config)
    except ValueError as error:
        changed = " ".join(f"{k}={v}" for k, v in overrides)
        raise SweepError(f"{error} (with {changed})") from None
    return config


def run_status(workdir: str) -> str:
    """``'complete'`` (``metrics.json`` has reached its ``total_steps``), ``'started'`` (a
    checkpoint to resume from, or an incomplete ``metrics.json``) or ``'new'``."""
    from proxy_jax import checkpoints

    try:
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics = json.load(f)
        if metrics.get("step", -1) >= metrics.get("total_steps", float("inf")):
            return "complete"
    except (OSError, ValueError):
        pass
    return "started" if checkpoints.has_checkpoint(workdir) else "new"
