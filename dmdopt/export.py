"""Tuned configs: the recommended trial's settings, written for production training to read.

A tuned config is data, never code: TOML (written by the small writer below, read by
`tomllib`), JSON, or YAML (`yaml.safe_dump` / `yaml.safe_load` only), chosen by the file's
extension. Schema version 1::

    schema_version = 1
    [dmd]         DMDConfig.to_dict()        (horizon `inf` is the string "inf")
    [training]    TrainConfig.to_dict()
    [model]       ModelConfig.to_dict()
    [problem]     ProblemConfig.to_dict()
    [provenance]  study_name, trial_number, policy, storage (password masked), dataset_hash,
                  versions {dmdopt, torch, optuna, mlflow} and git_commit of the code that ran
                  the trial, created_at (UTC, the export's time)
    [expected]    the trial's metrics: cost_bpe, cost_total, val_rel_l2, test_rel_l2, speedup,
                  speedup_first_passage (against the reference's own first passage to its
                  final error, the stricter ratio the recommendation filters on),
                  device (where the trial ran), cpu_threads and cpu_capability (torch's threads
                  and vector kernels there, on a CPU), and what they were measured at:
                  max_steps (the trial's budget) and settings_hash (`settings_hash()` of the
                  four settings sections as exported), so that production compares its run
                  with them only when neither was changed since

TOML has no null: a key whose value is None is left out, and reading puts None back -- only
keys whose default is None may be missing; any other missing key is an error, so a config
never silently falls back to a default. [provenance] and [expected] may be absent (a
hand-written config has no study behind it); the four settings sections may not.

Writing is atomic (temporary file in the destination's directory, then `os.replace`) and the
text is parsed back and compared before it replaces anything. Reading validates everything;
each mistake is a `UserError` of one line naming the file, the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dmdopt._util import atomic_file, git_commit, mask_url, os_reason, versions
from dmdopt.errors import UserError
from dmdopt.model import ModelConfig
from dmdopt.pareto import missed_target, speedup, speedup_first_passage
from dmdopt.training.config import TRAIN_FLOAT_FIELDS, DMDConfig, TrainConfig

SCHEMA_VERSION = 1
FORMATS = {".toml": "toml", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}
SETTINGS_SECTIONS = ("dmd", "training", "model", "problem")
PROVENANCE_KEYS = ("study_name", "trial_number", "policy", "storage", "dataset_hash", "versions",
                   "git_commit", "created_at")
# settings added after checkpoints were first named by `settings_hash`, whose default (None)
# keeps a config's behaviour: left out of the hash while None, so a production run started
# before they existed resumes its checkpoint instead of restarting under a new name
_ADDED_LATER = {"training": ("accept_rows",)}
# a trial's settings recorded before a field existed: the behaviour of then, where today's
# default differs (growing came in as "drop", which the code before it always did; its
# default is "auto" since). Without this an old trial would export settings it never ran.
_RECORDED_BEFORE = {"dmd": {"growing": "drop"}}
EXPECTED_KEYS = ("cost_bpe", "cost_total", "cost_to_reference", "reference_val_rel_l2",
                 "val_rel_l2", "test_rel_l2", "speedup", "speedup_first_passage", "device",
                 "cpu_threads", "cpu_capability", "max_steps", "settings_hash")


def _problem_cls():
    from dmdopt.problem import ProblemConfig

    return ProblemConfig


@dataclass(frozen=True)
class TunedConfig:
    """Everything production training needs, plus where it came from and what it should give."""

    dmd: DMDConfig
    training: TrainConfig
    model: ModelConfig
    problem: Any  # dmdopt.problem.ProblemConfig (imported lazily: problem/ builds datasets)
    provenance: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The file's content as plain data (non-finite floats as "inf"/"-inf"/"nan")."""
        return _plain({
            "schema_version": SCHEMA_VERSION,
            "dmd": self.dmd.to_dict(),
            "training": self.training.to_dict(),
            "model": self.model.to_dict(),
            "problem": self.problem.to_dict(),
            "provenance": dict(self.provenance),
            "expected": dict(self.expected),
        })

    def settings_hash(self) -> str:
        """sha256 (16 hex) of the settings that determine the trained weights step by step.

        Leaves out `training.max_steps` and `training.device` (so a longer run, or a run moved
        to another machine, continues the same checkpoint) and provenance/expected.
        """
        return self._settings_hash()

    def legacy_settings_hashes(self) -> list[str]:
        """The names dmdopt may have given this config's checkpoint before 2026-12-03, when a
        whole-number `lr`, `momentum` or `target_error` written as an integer (`lr = 2`)
        hashed apart from the float it is now stored as (which of them were written so is not
        known: every combination). Production renames such a checkpoint, never retrains."""
        import itertools

        whole = [k for k in TRAIN_FLOAT_FIELDS
                 if isinstance(v := getattr(self.training, k), float) and v.is_integer()]
        subsets = itertools.chain.from_iterable(
            itertools.combinations(whole, n) for n in range(1, len(whole) + 1))
        return [self._settings_hash(as_int=s) for s in subsets]

    def _settings_hash(self, *, as_int: tuple[str, ...] = ()) -> str:
        import hashlib

        data = self.to_dict()
        data["training"] = {k: int(v) if k in as_int else v for k, v in data["training"].items()}
        settings = {k: data[k] for k in SETTINGS_SECTIONS}
        settings["training"] = {k: v for k, v in settings["training"].items()
                                if k not in ("max_steps", "device")}
        for section, keys in _ADDED_LATER.items():  # unset: the hash (checkpoint) of before
            settings[section] = {k: v for k, v in settings[section].items()
                                 if not (k in keys and v is None)}
        text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """Tuples -> lists, non-finite floats -> strings: data every format can hold."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


# ------------------------------------------------------------------------------------------
# export


def _has_first_passage(summary: dict, attrs: dict) -> bool:
    """Whether the trial's first-passage speed-up is measured, not the budget's ratio again."""
    ref = summary.get("reference") or {}
    return (attrs.get("speedup_first_passage") is not None
            or ref.get("first_passage_bpe") is not None or isinstance(ref.get("to_target"), dict))


def _find_trial(summary: dict, number: int) -> dict:
    for t in summary.get("trials", []):
        if t.get("number") == number:
            return t
    raise UserError(f"study {summary.get('study_name')!r} has no trial {number!r}")


def tuned_config_from_summary(summary: dict, *, policy: str = "knee", value: float | None = None,
                              number: int | None = None) -> TunedConfig:
    """The TunedConfig of trial `number`, or of the trial the policy recommends."""
    from dmdopt.search.recommend import format_policy, parse_policy, points_from_summary, recommend
    from dmdopt.search.summary import no_faster

    if number is None and summary.get("mode") == "cost_to_target":
        # one objective: the study's best feasible trial (what `study status` names); the
        # trade-off policies need a front
        if not summary.get("pareto"):
            raise UserError(f"study {summary.get('study_name')!r} has no COMPLETE trial within its "
                            "constraints to export; pick one with --trial N")
        number, policy_text = summary["pareto"][0], "best (cost_to_target)"
        best = _find_trial(summary, number)
        if missed_target(best):
            # a miss (charged spend x (1 + error/target)): the best is slower than plain
            # training to nowhere; the two-objective mode refuses the like ("nothing beats")
            raise UserError(
                f"no trial of study {summary.get('study_name')!r} reached its target; the best, "
                f"trial {number}, ended at val error {best['values'][1]:.4g} after "
                f"{best['values'][0]:.0f} "
                f"bpe: raise target_error, or export it anyway with --trial {number}")
        if no_faster(summary, best):
            raise UserError(
                f"no trial of study {summary.get('study_name')!r} reached its target sooner "
                f"than plain training; the best, trial {number}, took {best['values'][0]:.0f} "
                f"bpe ({speedup_first_passage(summary, best):.2f}x plain's speed): export it "
                f"anyway with --trial {number}")
    elif number is None:
        policy, value = parse_policy(policy, value)
        points = points_from_summary(summary)
        ratio = ((summary.get("config") or {}).get("study") or {}).get("max_error_ratio")
        complete = sum(t.get("state") == "COMPLETE" for t in summary.get("trials") or [])
        if not points and complete and ratio is not None:
            raise UserError(
                f"none of the {complete} COMPLETE trial(s) ends within the study's "
                f"max_error_ratio = {ratio:g} of the reference's error, so there is nothing to "
                "recommend; pick one with --trial N (`dmdopt study status` lists them)")
        number = recommend(points, summary.get("reference"), policy=policy, value=value)
        policy_text = format_policy(policy, value)
    else:
        policy_text = "manual"
    trial = _find_trial(summary, number)
    if trial.get("state") != "COMPLETE":
        raise UserError(f"trial {number} is {trial.get('state')}, not COMPLETE: nothing to export")
    attrs = trial.get("user_attrs", {})
    config = summary.get("config") or {}
    # the model and problem the trials ran: the study's resolved settings, which its creator's
    # defaults filled in; a study made before dmdopt stored them has only the file's sections,
    # which this dmdopt's defaults fill in
    resolved = summary.get("resolved") or {}
    where = f"study {summary.get('study_name')!r} trial {number}"
    for key in ("training", "dmd"):
        if not isinstance(attrs.get(key), dict):
            raise UserError(f"{where}: user attribute {key!r} (its settings) is missing")
    recorded = _RECORDED_BEFORE["dmd"] | attrs["dmd"]
    rank, window = recorded.get("rank"), recorded.get("window")
    if (isinstance(rank, int) and not isinstance(rank, bool) and isinstance(window, int)
            and window > 2 and rank == window - 1):
        # recorded before 2026-12-01, when the search clipped ranks to window - 1 and the DMD
        # clipped them again to window - 2 (the modes a window supports): the rank it ran
        recorded = recorded | {"rank": window - 2}
    try:
        dmd = DMDConfig.from_dict(recorded)
        training = TrainConfig.from_dict(attrs["training"])
        model = ModelConfig.from_dict(resolved.get("model") or config.get("model", {}))
        problem = _problem_cls().from_dict(resolved.get("problem") or config.get("problem", {}))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None

    values = trial.get("values") or []  # the point (cost_bpe, val_rel_l2), in either mode
    expected = {
        "cost_bpe": values[0] if values else None,
        "cost_total": attrs.get("cost_total"),
        "val_rel_l2": values[1] if len(values) >= 2 else attrs.get("val_error"),
        "test_rel_l2": attrs.get("test_error"),
        # the error plain training ended at, and where this trial first reached it: production
        # reports its own cost to that error beside its whole spend (`cost_total`), so the
        # speed-up a study measured can be checked on the production run
        "cost_to_reference": attrs.get("cost_to_reference") if attrs.get("reached_reference") else None,
        "reference_val_rel_l2": (summary.get("reference") or {}).get("val_rel_l2"),
        # the speed-up of this point's cost (a cost_to_target trial records the one to the
        # reference's error, not to the study's target): the one the front and dashboard show
        "speedup": speedup(summary, trial),
        # only where there is a first passage to compare with: a study stored before the
        # reference recorded one would repeat `speedup` under the stricter ratio's name
        "speedup_first_passage": (speedup_first_passage(summary, trial) if _has_first_passage(
            summary, attrs) else None),
        "device": attrs.get("device"),
        "cpu_threads": attrs.get("cpu_threads") if attrs.get("device") == "cpu" else None,
        "cpu_capability": attrs.get("cpu_capability") if attrs.get("device") == "cpu" else None,
    }
    code = attrs.get("code") or {}  # the code the trial ran; older studies: the exporter's
    provenance = {
        "study_name": summary.get("study_name"),
        "trial_number": number,
        "policy": policy_text,
        "storage": mask_url(summary.get("storage")),
        # the trials' dataset: another solver version gives another hash for the same fields
        "dataset_hash": resolved.get("dataset_hash") or problem.config_hash(),
        "versions": code.get("versions") or versions(),
        "git_commit": code.get("git_commit") if code else git_commit(),
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
    }
    tuned = TunedConfig(dmd=dmd, training=training, model=model, problem=problem,
                        provenance={k: v for k, v in provenance.items() if v is not None})
    # what the figures were measured at: a later edit of either makes them another run's
    expected |= {"max_steps": training.max_steps, "settings_hash": tuned.settings_hash()}
    return dataclasses.replace(tuned, expected={  # NaN: nothing to compare
        k: v for k, v in expected.items()
        if v is not None and not (isinstance(v, float) and math.isnan(v))})


def export_tuned_config(summary: dict, path: str | os.PathLike, *, policy: str = "knee",
                        value: float | None = None, number: int | None = None) -> TunedConfig:
    """Write the recommended (or the given) trial of a study summary to `path`; return it."""
    path = Path(path)
    fmt = _format_of(path)
    tuned = tuned_config_from_summary(summary, policy=policy, value=value, number=number)
    write_tuned_config(tuned, path, fmt=fmt)
    return tuned


def write_tuned_config(tuned: TunedConfig, path: str | os.PathLike, *, fmt: str | None = None) -> None:
    """Serialise, check the text reads back to the same config, then replace `path` atomically."""
    path = Path(path)
    fmt = fmt or _format_of(path)
    text = _dumps(tuned.to_dict(), fmt)
    back = _validate(_parse(text, fmt, str(path)), str(path))
    if back.to_dict() != tuned.to_dict():  # a writer bug must not produce a file that means something else
        raise RuntimeError(f"tuned config for {path} does not read back identically")
    try:
        with atomic_file(path) as fh:
            fh.write(text)
    except OSError as exc:
        raise UserError(f"cannot write tuned config {path}: {os_reason(exc, path)}") from None


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown extension {path.suffix!r} "
                        f"(use one of {', '.join(sorted(FORMATS))})")
    return fmt


_HEADER = ("# dmdopt tuned config (schema_version 1): written by `dmdopt export`, read by\n"
           "# `dmdopt train --config`. Data only; every value is validated on load.\n")


def _dumps(data: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    if fmt == "yaml":
        import yaml

        return _HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return _HEADER + _toml_dumps(data)


# ------------------------------------------------------------------------------------------
# a tiny TOML writer (tomllib only reads): str, int, float, bool, lists, tables


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(text: str) -> str:
    """A TOML basic string, pure ASCII. Not json.dumps: it writes a character beyond U+FFFF
    (an emoji in a study name) as a surrogate pair, which TOML refuses; TOML spells it \\U."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:  # control characters, DEL and everything beyond ASCII
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)  # shortest round-trip form, always with '.' or 'e'
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _toml_dumps(data: dict, prefix: tuple[str, ...] = ()) -> str:
    """Scalars and arrays first, then one [table] per dict; None values are left out."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables:
        name = ".".join(_toml_key(k) for k in (*prefix, key))
        out += f"\n[{name}]\n" + _toml_dumps(table, (*prefix, key))
    return out


# ------------------------------------------------------------------------------------------
# reading


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


_YAML_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


_TEXT_KEYS = ("device", "cpu_capability", "settings_hash", "grouping", "growing",
              "snapshot_dtype", "snapshot_device", "optimizer", "activation")
"""Keys whose values are text: a hash `379865906e614232` reads as an exponent, not a number."""


def _yaml_numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; in a config's numeric fields it can only
    mean the number (text fields are left alone)."""
    if isinstance(value, dict):
        return {k: v if k in _TEXT_KEYS else _yaml_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_numbers(v) for v in value]
    if isinstance(value, str) and _YAML_EXP_FLOAT.match(value.strip()):
        return float(value)
    return value


def _parse(text: str, fmt: str, where: str) -> Any:
    try:
        if fmt == "toml":
            return tomllib.loads(text)
        if fmt == "json":
            return json.loads(text)
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, dict):  # only where numbers are meant, never in provenance strings
            data = {k: _yaml_numbers(v) if k in (*SETTINGS_SECTIONS, "expected") else v
                    for k, v in data.items()}
        return data
    except Exception as exc:  # each parser has its own error type; all mean "not readable"
        raise UserError(f"{where}: not valid {fmt.upper()}: {_one_line(exc)}") from None


def load_tuned_config(path: str | os.PathLike) -> TunedConfig:
    """Read and validate a tuned config (TOML, JSON or YAML by extension)."""
    return _validate(_read(path), str(path))


def load_dmd_settings(path: str | os.PathLike) -> tuple[DMDConfig, dict]:
    """The `[dmd]` settings of a tuned config and its `[training]` table as written ({}
    without one: the optimiser and momentum the settings were tuned for): all that
    `DMDAccelerator.from_config` uses. A user's own training loop has no use for the
    regressor's `[model]` and the pollutant's `[problem]`, so `schema_version` and `[dmd]`
    make a complete file here; the other sections, when there, are not checked."""
    where = str(path)
    data = _read(path)
    _check_header(data, where)
    if "dmd" not in data:
        raise UserError(f"{where}: missing section [dmd]")
    dmd = _build(DMDConfig, _check_section(data["dmd"], "dmd", DMDConfig, where), "dmd", where)
    training = data.get("training")
    return dmd, dict(training) if isinstance(training, dict) else {}


def _read(path: str | os.PathLike) -> Any:
    """A tuned config file's parsed data, not yet validated."""
    path = Path(path)
    if path.is_dir():  # before the extension: a folder has none to speak of
        raise UserError(f"tuned config {path} is a directory")
    fmt = _format_of(path)
    if not path.is_file():
        raise UserError(f"tuned config not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors): no error
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {_one_line(exc)}") from None
    return _parse(text, fmt, str(path))


def tuned_config_from_dict(data: dict, *, where: str = "tuned config") -> TunedConfig:
    """Validate plain data (as read from a file) into a TunedConfig."""
    return _validate(data, where)


def _check_section(table: Any, section: str, cls: type, where: str) -> dict:
    """Unknown or missing keys -> UserError; None put back for keys TOML could not write."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: [{section}] must be a table, got {_one_line(repr(table))}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise UserError(f"{where}: unknown key {section}.{key} = {_one_line(repr(table[key]))}")
    data = dict(table)
    for name, f in known.items():
        if name not in data:
            if f.default is None:
                data[name] = None
            else:
                raise UserError(f"{where}: missing key {section}.{name}")
        elif isinstance(f.default, tuple) and not isinstance(data[name], (list, tuple)):
            raise UserError(f"{where}: {section}.{name} must be a list, "
                            f"got {_one_line(repr(data[name]))}")
    return data


def _build(cls: Any, data: dict, section: str, where: str) -> Any:
    try:
        return cls.from_dict(data)
    except (ValueError, TypeError) as exc:
        msg = _one_line(exc)
        first = msg.split(" ", 1)[0]
        if first in {f.name for f in dataclasses.fields(cls)}:  # "grid must be ..." -> problem.grid
            msg = f"{section}.{msg}"
        elif not msg.startswith((f"{section}.", f"{section}:")):
            msg = f"{section}: {msg}"
        raise UserError(f"{where}: {msg}") from None


def _check_provenance(table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"{where}: [provenance] must be a table, got {_one_line(repr(table))}")
    for key, value in table.items():
        if key not in PROVENANCE_KEYS:
            raise UserError(f"{where}: unknown key provenance.{key} = {_one_line(repr(value))}")
    number = table.get("trial_number")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
        raise UserError(f"{where}: provenance.trial_number must be a trial number, got {number!r}")
    vers = table.get("versions")
    if vers is not None and (not isinstance(vers, dict)
                             or not all(isinstance(v, str) for v in vers.values())):
        raise UserError(f"{where}: provenance.versions must be a table of strings, got {vers!r}")
    for key in ("study_name", "policy", "storage", "dataset_hash", "git_commit", "created_at"):
        if table.get(key) is not None and not isinstance(table[key], str):
            raise UserError(f"{where}: provenance.{key} must be a string, got {table[key]!r}")
    return dict(table)


def _check_expected(table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise UserError(f"{where}: [expected] must be a table, got {_one_line(repr(table))}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in EXPECTED_KEYS:  # a figure a newer dmdopt records: nothing to compare
            logging.getLogger(__name__).warning(
                "%s: expected.%s is not a figure this dmdopt knows (written by a newer one?); "
                "ignored", where, key)
            continue
        if value is None:
            continue
        if key in ("device", "cpu_capability", "settings_hash"):
            if not isinstance(value, str):
                raise UserError(f"{where}: expected.{key} must be a string, got {value!r}")
            out[key] = value
            continue
        if key in ("cpu_threads", "max_steps"):  # counts: compared with the production run's
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}: expected.{key} must be an integer >= 1, "
                                f"got {value!r}")
            out[key] = value
            continue
        if isinstance(value, str) and value.strip().lower() == "inf":
            out[key] = math.inf  # how an infinite number is written
            continue
        if isinstance(value, str) and value.strip().lower() == "nan":
            continue  # nothing to compare with (export no longer writes it; older files may)
        # a cost, an error and a speed-up are all > 0 (an error of 0 would make every run
        # "differ from the trial" by an infinite ratio)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or value <= 0:
            raise UserError(f"{where}: expected.{key} must be a number > 0, got {value!r}")
        out[key] = value
    return out


def _check_header(data: Any, where: str) -> None:
    """A table of known sections, of the schema version this dmdopt reads."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a table of sections, got {_one_line(repr(data))[:80]}")
    if "schema_version" not in data:
        if isinstance(data.get("study"), dict):  # the other kind of dmdopt file
            raise UserError(f"{where}: this is a study file ([study] table), not a tuned config: "
                            "run it with `dmdopt study run`, then `dmdopt export` its result")
        raise UserError(f"{where}: missing key schema_version (this dmdopt reads {SCHEMA_VERSION})")
    version = data["schema_version"]
    if version != SCHEMA_VERSION or not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where}: unsupported schema_version {version!r} "
                        f"(this dmdopt reads {SCHEMA_VERSION})")
    allowed = {"schema_version", *SETTINGS_SECTIONS, "provenance", "expected"}
    for key in data:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key} (sections: {', '.join(sorted(allowed - {'schema_version'}))})")


def _validate(data: Any, where: str) -> TunedConfig:
    _check_header(data, where)
    for section in SETTINGS_SECTIONS:
        if section not in data:
            raise UserError(f"{where}: missing section [{section}]")
    problem_cls = _problem_cls()
    classes = {"dmd": DMDConfig, "training": TrainConfig, "model": ModelConfig,
               "problem": problem_cls}
    built = {s: _build(classes[s], _check_section(data[s], s, classes[s], where), s, where)
             for s in SETTINGS_SECTIONS}
    return TunedConfig(**built,
                       provenance=_check_provenance(data.get("provenance", {}), where),
                       expected=_check_expected(data.get("expected", {}), where))
