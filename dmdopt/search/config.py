"""Study files: TOML data describing one study, validated on load.

Every mistake (unknown key, wrong type, empty or inverted range, rank above window - 2) is a
`UserError` naming the key and the value; nothing is created before the file validated.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmdopt._util import DEFAULT_STORAGE
from dmdopt.errors import UserError
from dmdopt.model import ModelConfig
from dmdopt.training.config import GROWING_CHOICES, DMDConfig, TrainConfig

SAMPLERS = ("nsga2", "tpe", "gp", "random")
MAX_NAME = 250  # characters of a study name: MLflow's run-name column (its parent run's name)
MODES = ("multi", "cost_to_target")


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class RankSpace:
    """Either an integer range (capped at window - 2 per trial) or an energy-fraction range."""

    kind: str  # "int" | "energy"
    low: float
    high: float


@dataclass(frozen=True)
class HorizonSpace:
    low: float
    high: float
    include_inf: bool = False


@dataclass(frozen=True)
class SearchSpace:
    window: IntRange
    rank: RankSpace
    horizon: HorizonSpace
    lr: FloatRange | None = None
    optimizer_state: tuple[str, ...] | None = None
    line_search: tuple[str, ...] | None = None  # names of presets, see LINE_SEARCH_PRESETS
    growing: tuple[str, ...] | None = None  # DMDConfig.growing choices


# horizon factors (DMDConfig.line_search) a study may choose between: `default` is
# DMDConfig's ladder, reaching far past the sampled horizon; the others only at or below it
LINE_SEARCH_PRESETS = {
    "default": DMDConfig().line_search,
    "none": (1.0,),
    "coarse": (1.0, 0.25, 0.0625),
    "fine": (1.0, 0.5, 0.25, 0.125, 0.0625),
}


@dataclass(frozen=True)
class StudyConfig:
    name: str
    n_trials: int | None
    timeout: float | None
    sampler: str
    seed: int
    storage: str
    mode: str
    target_error: float | None
    max_error_ratio: float | None
    problem: dict  # validated by ProblemConfig.from_dict
    model: ModelConfig
    training: TrainConfig
    dmd: dict  # fixed DMD options (not searched), merged under each trial's knobs
    space: SearchSpace
    raw: dict = field(repr=False, default_factory=dict)


def _where(path: str | Path) -> str:
    return str(path)


def _take(table: dict, key: str, types: tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise UserError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise UserError(f"{where}: {key} must be {names}, got {value!r}")
    return value


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}")


def _range(table: Any, where: str, *, integer: bool, positive: bool = False,
           extra: frozenset[str] = frozenset({"log"})) -> tuple:
    """(low, high, log) of a range table; `extra` names the keys besides low/high it reads."""
    _check_keys(table, {"low", "high"} | extra, where)
    types = (int,) if integer else (int, float)
    low = _take(table, "low", types, where)
    high = _take(table, "high", types, where)
    for key, value in (("low", low), ("high", high)):
        if not integer and not math.isfinite(value):
            raise UserError(f"{where}.{key} must be finite, got {value!r}")
        if positive and value <= 0:
            raise UserError(f"{where}.{key} must be > 0, got {value!r}")
    if low > high:
        raise UserError(f"{where}: empty or inverted range low={low!r} > high={high!r}")
    log = _take(table, "log", (bool,), where, False)
    if log and low <= 0:
        raise UserError(f"{where}.low must be > 0 for a log range, got {low!r}")
    return low, high, log


def _parse_space(table: Any, where: str) -> SearchSpace:
    _check_keys(table, {"window", "rank", "horizon", "lr", "optimizer_state", "line_search",
                       "growing"}, where)
    for key in ("window", "rank", "horizon"):
        if key not in table:
            raise UserError(f"{where}: missing key {key!r}")
    lo, hi, log = _range(table["window"], f"{where}.window", integer=True)
    if lo < 3:
        raise UserError(f"{where}.window.low must be >= 3, got {lo!r}")
    window = IntRange(lo, hi, log)

    rank_t = table["rank"]
    if not isinstance(rank_t, dict):
        raise UserError(f"{where}.rank must be a table (low, high and optionally kind), "
                        f"got {rank_t!r}")
    kind = rank_t.get("kind", "int")
    if kind not in ("int", "energy"):
        raise UserError(f"{where}.rank.kind must be 'int' or 'energy', got {kind!r}")
    # the rank is sampled on a linear scale (small integers, or energies near 1): no `log`
    rlo, rhi, _ = _range(rank_t, f"{where}.rank", integer=(kind == "int"), extra=frozenset({"kind"}))
    if kind == "int":
        if rlo < 0:
            raise UserError(f"{where}.rank.low must be >= 0, got {rlo!r}")
        if rlo > window.high - 2:  # a window of m snapshots has m - 2 difference pairs
            raise UserError(
                f"{where}.rank.low={rlo!r} exceeds window.high - 2 = {window.high - 2} "
                "(a window supports at most window - 2 DMD modes)"
            )
    elif not (0 < rlo <= rhi <= 1):
        raise UserError(f"{where}.rank: an energy range must lie in (0, 1], got [{rlo!r}, {rhi!r}]")
    rank = RankSpace(kind, rlo, rhi)

    h_t = table["horizon"]
    # the horizon is always sampled on a log scale (`HorizonSpace`): `log` is not a choice
    hlo, hhi, _ = _range(h_t, f"{where}.horizon", integer=False, positive=True,
                         extra=frozenset({"include_inf"}))
    include_inf = _take(h_t, "include_inf", (bool,), f"{where}.horizon", False)
    horizon = HorizonSpace(float(hlo), float(hhi), include_inf)

    lr = None
    if "lr" in table:
        llo, lhi, llog = _range(table["lr"], f"{where}.lr", integer=False, positive=True)
        lr = FloatRange(float(llo), float(lhi), llog)

    def choices(key: str, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}.{key} must be a non-empty list of choices, got {value!r}")
        for v in value:
            if v not in allowed:
                raise UserError(f"{where}.{key}: unknown choice {v!r} (allowed: {', '.join(allowed)})")
        return tuple(value)

    return SearchSpace(
        window=window, rank=rank, horizon=horizon, lr=lr,
        optimizer_state=choices("optimizer_state", ("keep", "reset")),
        line_search=choices("line_search", tuple(LINE_SEARCH_PRESETS)),
        growing=choices("growing", GROWING_CHOICES),
    )


def parse_study(data: dict, *, where: str = "study file") -> StudyConfig:
    """Validate a study dict (parsed TOML) into a `StudyConfig`."""
    from dmdopt.problem import ProblemConfig

    if "schema_version" in data and "study" not in data:  # the other kind of dmdopt file
        raise UserError(f"{where}: this is a tuned config (from `dmdopt export`), not a study "
                        "file: train with it by `dmdopt train --config`")
    _check_keys(data, {"study", "problem", "model", "training", "dmd", "search"}, where)
    study = data.get("study")
    if study is None:
        raise UserError(f"{where}: missing table [study]")
    _check_keys(study, {"name", "n_trials", "timeout", "sampler", "seed", "storage", "mode",
                        "target_error", "max_error_ratio"}, f"{where} [study]")
    w = f"{where} [study]"
    name = _take(study, "name", (str,), w)
    if not name or any(c in name for c in "/\\ \t\n"):
        raise UserError(f"{w}: name must be a non-empty word without slashes or spaces, got {name!r}")
    if len(name) > MAX_NAME:  # a SQL MLflow store holds 250 (run names): tracking failed for good
        raise UserError(f"{w}: name must be at most {MAX_NAME} characters (MLflow's limit), got "
                        f"{len(name)}: {name[:40]}...")
    n_trials = _take(study, "n_trials", (int,), w, None)
    if n_trials is not None and n_trials < 1:
        raise UserError(f"{w}: n_trials must be >= 1, got {n_trials!r}")
    timeout = _take(study, "timeout", (int, float), w, None)
    if timeout is not None and not 0 < timeout < float("inf"):  # also refuses nan
        raise UserError(f"{w}: timeout must be > 0 seconds, got {timeout!r}")
    sampler = _take(study, "sampler", (str,), w, "nsga2")
    if sampler not in SAMPLERS:
        raise UserError(f"{w}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    seed = _take(study, "seed", (int,), w, 0)
    if not 0 <= seed < 2**32:  # the samplers' numpy RNGs take 32 bits (2**32 aliased seed 0)
        raise UserError(f"{w}: seed must be an integer in [0, 2**32), got {seed!r}")
    storage = _take(study, "storage", (str,), w, DEFAULT_STORAGE)
    mode = _take(study, "mode", (str,), w, "multi")
    if mode not in MODES:
        raise UserError(f"{w}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    target_error = _take(study, "target_error", (int, float), w, None)
    if target_error is not None and not 0 < target_error < float("inf"):
        raise UserError(f"{w}: target_error must be a finite number > 0, got {target_error!r}")
    if target_error is not None and mode != "cost_to_target":  # it would be silently unused
        raise UserError(f"{w}: target_error applies only with mode = \"cost_to_target\" (the "
                        "two-objective mode measures cost to the reference's own error)")
    max_error_ratio = _take(study, "max_error_ratio", (int, float), w, None)
    if max_error_ratio is not None and not 0 < max_error_ratio < float("inf"):  # refuses nan
        raise UserError(f"{w}: max_error_ratio must be a finite number > 0, got {max_error_ratio!r}")

    problem = data.get("problem", {})
    for table in ("problem", "model", "training", "dmd", "search"):
        if not isinstance(data.get(table, {}), dict):
            raise UserError(f"{where}: {table} must be a table, got {data[table]!r}")
    try:
        ProblemConfig.from_dict(problem)
        model = ModelConfig.from_dict(data.get("model", {}))
        training = TrainConfig.from_dict(data.get("training", {}))
        if training.target_error is not None:  # the reference and every trial would stop there
            raise ValueError("training.target_error does not apply in a study file: both "
                             "objectives are measured over the whole budget; for a study that "
                             "trains to a target use [study] mode = \"cost_to_target\" with "
                             "target_error (a study made with it before this check: remove it "
                             "and give the study another [study] name)")
        dmd_fixed = data.get("dmd", {})
        if not isinstance(dmd_fixed, dict):
            raise ValueError(f"dmd: expected a table, got {dmd_fixed!r}")
        for key in ("window", "rank", "horizon"):
            if key in dmd_fixed:
                raise ValueError(f"dmd.{key} is searched: set its range under [search.{key}]")
        search = data.get("search", {}) if isinstance(data.get("search", {}), dict) else {}
        for key in ("optimizer_state", "growing", "line_search"):
            if key in dmd_fixed and key in search:  # the trial's choice would silently win
                raise ValueError(f"dmd.{key} = {dmd_fixed[key]!r} is also searched "
                                 f"(search.{key}): fix it or search it, not both (a study made "
                                 "before this check: give it another [study] name)")
        DMDConfig.from_dict(dmd_fixed | {"window": 20, "rank": 1, "horizon": 10})
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {exc}") from None
    space = _parse_space(data.get("search", {}), f"{where} [search]")
    warmup = dmd_fixed.get("warmup", 0)
    if space.window.high + warmup > training.max_steps:  # a window longer than the run never jumps
        raise UserError(f"{where} [search]: window.high = {space.window.high}"
                        + (f" after dmd.warmup = {warmup}" if warmup else "")
                        + f" exceeds training.max_steps = {training.max_steps}: such a window "
                        "never fills, so DMD would never run")
    if training.eval_every >= training.max_steps:
        # the cost objective is read off the validation curve: with one point at the end,
        # every trial that gets there costs its whole budget, whatever DMD saved
        raise UserError(f"{where} [training]: eval_every = {training.eval_every} is not below "
                        f"max_steps = {training.max_steps}: the cost to the reference's error "
                        "could be measured only at the budget's end; lower eval_every")
    if n_trials is None and timeout is None:
        raise UserError(f"{w}: set n_trials or timeout (or both)")
    return StudyConfig(name=name, n_trials=n_trials, timeout=timeout, sampler=sampler, seed=seed,
                       storage=storage, mode=mode, target_error=target_error,
                       max_error_ratio=max_error_ratio, problem=problem, model=model,
                       training=training, dmd=dmd_fixed, space=space, raw=data)


def shipped_studies() -> dict[str, Any]:
    """The study files that ship inside the package (the repository's `studies/`), by name:
    paths, or importlib Traversables where the package is not on a file system (a zip); the
    repository's folder when `dmdopt.studies` is not mapped (a checkout on PYTHONPATH)."""
    from importlib.resources import files

    try:
        folder = files("dmdopt.studies")
        entries = list(folder.iterdir())
    except (ModuleNotFoundError, FileNotFoundError):
        entries = list((Path(__file__).resolve().parents[2] / "studies").glob("*.toml"))
    return {f.name.removesuffix(".toml"): f for f in entries
            if f.name.endswith(".toml") and f.is_file()}


def load_study_file(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file: a path, or the name of a shipped study (`quick`,
    `quick.toml`) when no such file is here, so the README's studies run from any folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"study file {p} is a directory")
    if not p.is_file() and not re.search(r"[/\\]", str(path)):  # a bare name, not ./quick.toml
        p = shipped_studies().get(p.name.removesuffix(".toml"), p)
    if not p.is_file():
        names = ", ".join(sorted(shipped_studies()))
        raise UserError(f"study file not found: {p} (shipped studies, by name: {names})")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors): no error
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_study(data, where=str(p))
