"""Online experiments (issue 17): which arm of which experiment serves a user.

An experiments file (YAML, checked against `ExperimentsFile`) declares experiments in layers:

```yaml
experiments:
  - name: diversity-test
    layer: ranking            # experiments of one layer split its users; layers are independent
    traffic: 0.5              # share of the layer's users that enter this experiment
    arms:
      - {name: control, weight: 1}
      - {name: diverse, weight: 1, diversity: 0.3}
  - name: popular-vs-personal
    layer: retrieval
    arms:
      - {name: personal}
      - {name: popular, source: popularity}
```

Assignment is sticky and deterministic, with no state: a user's bucket in a layer is a salted
hash of the user id (the layer's name is the salt), and the layer's experiments own consecutive
ranges of its 10,000 buckets in file order (their `traffic`); inside an experiment a second hash
(salted with the experiment's `salt`, by default its name) picks the arm by weight. So a user keeps
their arm across requests, workers and restarts, the arms of two layers are independent, and
changing one experiment's salt reshuffles its users without moving anyone else's. An arm sets what
serving can vary per request: the source of the list (`personal`, the model's own, or `popularity`,
the trending list every user gets), the MMR `diversity`, the candidate sources and the share of exploration slots (`explore`).

Serving re-reads the file when it changes (`ExperimentsSource.current`); a file that fails the
schema is reported and the last good one stays in force.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)
EPSILON = 1e-6  # of a bucket: float error in a running total of traffics
BUCKETS = 10_000
NAME = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_WEIGHT = 1e6  # weights are relative: a million to one is finer than the buckets can split
CandidateSource = Literal["ann", "item_knn", "trending"]


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    # finite and bounded: an infinite weight, or weights whose sum overflows, made every share 0 or NaN
    # and sent every user to the last arm
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT, allow_inf_nan=False,
                          description="relative share of the experiment's users")
    source: Literal["personal", "popularity"] = Field("personal", description="personal: the model's list; "
                                                      "popularity: the trending list, for every user")
    diversity: float | None = Field(None, ge=0.0, le=1.0, description="MMR diversity; None: the request's")
    candidates: tuple[CandidateSource, ...] | None = Field(None, min_length=1,
                                                           description="candidate sources; None: all")
    explore: float | None = Field(None, ge=0.0, le=1.0, description="share of the slots given to fresh items "
                                  "(Thompson sampling); None: the server's STREAMREC_EXPLORE_SHARE")


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    layer: str = Field("default", pattern=NAME)
    # at least one bucket: a smaller share rounds to no bucket, an experiment that silently gets no users
    traffic: float = Field(1.0, ge=1 / BUCKETS, le=1.0, description="share of the layer's users in this experiment")
    salt: str | None = Field(None, max_length=128, description="reshuffles the arms; default: the name")
    arms: tuple[Arm, ...] = Field(min_length=1, max_length=64)

    @field_validator("arms")
    @classmethod
    def _distinct_arms(cls, arms: tuple[Arm, ...]) -> tuple[Arm, ...]:
        names = [arm.name for arm in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names repeat: {names}")
        total = sum(arm.weight for arm in arms)
        starved = [arm.name for arm in arms if arm.weight / total < 1 / BUCKETS]
        if starved:  # its share is below one draw in BUCKETS: an arm that silently gets no users
            raise ValueError(f"arm(s) {starved}: a weight under 1/{BUCKETS} of the experiment's total gets no users")
        return arms


class ExperimentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiments: tuple[Experiment, ...] = Field(default=(), max_length=256)

    @model_validator(mode="after")
    def _layers_fit(self) -> ExperimentsFile:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names repeat: {names}")
        for layer in {e.layer for e in self.experiments}:
            members = [e for e in self.experiments if e.layer == layer]
            total = sum(e.traffic for e in members)
            if total > 1.0 + 1e-9:
                raise ValueError(f"layer {layer!r}: its experiments' traffic adds up to {total:g} > 1")
        return self


def bucket_ends(traffics: list[float]) -> list[int]:
    """Where each experiment of a layer ends among its BUCKETS (file order: the first starts at 0,
    each next one where the one before ends): the running total's floor. Rounded share by share,
    the round-ups added up, and a later experiment began past the last bucket, with no users,
    while the file said otherwise. Floors of a running total give each experiment at least the
    floor of its own share (floor(a + b) >= floor(a) + floor(b)), so every experiment, whose
    traffic is at least 1/BUCKETS, gets a bucket; EPSILON keeps 0.3 * 10,000 = 2999.99... at 3,000."""
    return [min(BUCKETS, math.floor(total * BUCKETS + EPSILON)) for total in accumulate(traffics)]


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: Arm


def combined(assignments: list[Assignment]) -> Arm | None:
    """What the user's arms in all layers set, together: for each setting the first arm (file
    order) that sets it (layers are meant to vary different things)."""
    if not assignments:
        return None
    arms = [a.arm for a in assignments]
    return Arm.model_construct(name="+".join(arm.name for arm in arms),
               source=next((arm.source for arm in arms if arm.source != "personal"), "personal"),
               diversity=next((arm.diversity for arm in arms if arm.diversity is not None), None),
               candidates=next((arm.candidates for arm in arms if arm.candidates is not None), None),
               explore=next((arm.explore for arm in arms if arm.explore is not None), None))


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in [0, BUCKETS) under `salt`: the first 8 bytes of a BLAKE2b digest."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class Experiments:
    """A validated experiments file, ready to assign users."""

    def __init__(self, spec: ExperimentsFile) -> None:
        self.spec = spec
        self._layers: dict[str, list[tuple[int, Experiment, list[tuple[float, Arm]]]]] = {}
        for layer in dict.fromkeys(e.layer for e in spec.experiments):
            members = [e for e in spec.experiments if e.layer == layer]
            ranges = self._layers[layer] = []
            for end, experiment in zip(bucket_ends([e.traffic for e in members]), members):
                total = sum(arm.weight for arm in experiment.arms)
                cumulative, shares = 0.0, []
                for arm in experiment.arms:
                    cumulative += arm.weight / total
                    shares.append((cumulative, arm))
                ranges.append((end, experiment, shares))

    def __bool__(self) -> bool:
        return bool(self.spec.experiments)

    def assign(self, user_id: str) -> list[Assignment]:
        """The user's arm in each layer whose experiments cover their bucket (file order)."""
        found = []
        for layer, ranges in self._layers.items():
            position = bucket(f"layer\x00{layer}", user_id)
            for end, experiment, shares in ranges:
                if position < end:
                    draw = bucket(f"arm\x00{experiment.salt or experiment.name}", user_id) / BUCKETS
                    arm = next((a for limit, a in shares if draw < limit), shares[-1][1])
                    found.append(Assignment(experiment.name, arm))
                    break
        return found

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> Experiments:
        """ValueError naming `source` and what failed when the text is not a valid experiments file."""
        try:
            raw = yaml.safe_load(text)
            _within_node_budget(raw, source)
            return cls(ExperimentsFile.model_validate(raw if raw is not None else {}))
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not YAML: {exc}") from None
        except RecursionError:  # PyYAML composes nested values recursively: `x: [[[...]]]` of 2,000 levels
            raise ValueError(f"{source}: values nested too deeply to parse") from None
        except ValidationError as exc:  # the locations and messages: str(exc) repeats every input value
            raise ValueError(f"{source}: " + "; ".join(
                f"{'.'.join(map(str, error['loc'])) or '<file>'}: {error['msg']}"
                for error in exc.errors(include_url=False, include_input=False)[:20])) from None


GONE = b"gone"  # the stamp of a missing file (a digest is 16 bytes)
MAX_FILE_BYTES = 1 << 20  # an experiments file is a few kB; a 50 MB one stalled the sync thread as it parsed
MAX_NODES = 100_000  # values in the document with YAML aliases expanded


def _within_node_budget(document: object, source: str) -> None:
    """Refuse a document with more than MAX_NODES values once aliases are expanded. A 2 kB "billion
    laughs" file (aliases of aliases) is small as YAML but huge as the values the schema walks:
    describing it in the validation error took 75 s, holding the GIL, and the worker answered
    nothing meanwhile. Counting stops at the budget, so a bomb is refused in milliseconds."""
    pending, seen = [document], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ValueError(f"{source}: more than {MAX_NODES:,} values once YAML aliases are expanded: refused")
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


NO_EXPERIMENTS = Experiments(ExperimentsFile())


class ExperimentsSource:
    """The experiments file as serving sees it: parsed again when its content changes (`refresh`,
    called from the sync thread, reads it and compares a digest: a file of a few kB; its mtime and
    size missed a rewrite of the same size within one timestamp tick, and a copy that kept both);
    a file that fails the schema keeps the last good version in force and is reported in
    `last_error`. No file configured: no experiments."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current = NO_EXPERIMENTS
        self.last_error: str | None = None
        self._stamp: bytes | None = None  # the last content's digest; GONE once the file was missing
        self.refresh()

    def refresh(self) -> Literal["unchanged", "loaded", "failed"]:
        """Read the file again if it changed since the last call."""
        if self.path is None:
            return "unchanged"
        try:
            try:
                with open(self.path, "rb") as file:
                    data = file.read(MAX_FILE_BYTES + 1)  # bounded: a 50 MB file is refused unread
                stamp = hashlib.blake2b(data, digest_size=16).digest()
            except FileNotFoundError:
                data, stamp = b"", GONE  # reported once like a broken version, not at every poll
            if stamp == self._stamp:
                return "unchanged"
            self._stamp = stamp  # a broken version is reported once, then waits for the next change
            if stamp == GONE:
                raise FileNotFoundError(f"{self.path} is gone")
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"{self.path}: over {MAX_FILE_BYTES:,} bytes, more than an experiments file holds")
            self.current = Experiments.parse(data.decode("utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("experiments file not loaded, the last good one stays in force: %s", self.last_error)
            return "failed"
        self.last_error = None
        log.info("experiments loaded from %s: %d", self.path, len(self.current.spec.experiments))
        return "loaded"
