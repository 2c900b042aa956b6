"""The stages, each declared once: its notebook, the services it needs, the layers it reads and
writes, and the hops it reports for reconciliation. The runner (`--stages`, preflight, resume), the run
record, reconciliation and the reports read this table; nothing else names a stage.

Adding a stage: its notebook in notebooks/, one entry below, its module in lib/stages/ (`Stage.module`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lib.errors import PipelineError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# What a stage can need, checked by the runner's preflight before any kernel starts.
SERVICES = ("api", "store", "db", "cloud")


class Layer(str, Enum):
    """Where the data sits between stages: what a stage reads and writes. `label` names the layer on
    the run index and in the lineage picture."""

    def __new__(cls, value: str, label: str):
        layer = str.__new__(cls, value)
        layer._value_ = value
        layer.label = label
        return layer

    API = ("api", "source")
    RAW = ("raw", "raw")
    CLEAN = ("clean", "clean")
    QUARANTINE = ("quarantine", "quarantine")
    TABLE = ("table", "table")
    CLOUD = ("cloud", "export")
    GOLD = ("gold", "gold")


class UnknownStage(PipelineError, ValueError):
    """A stage name that is not in the registry."""


@dataclass(frozen=True)
class Hop:
    """One place the data passes, with its record count and content fingerprint as the stage that
    saw it recorded them (fields of that stage record's `details`). `equal` pairs a field of this
    stage with `stage.field` of an earlier one; all pairs must agree for the hop to reconcile with
    the hop named `against`. A stage can exempt a hop for a run by recording
    `unreconciled: {label: reason}`."""

    label: str
    rows: str
    fingerprint: str
    against: str | None = None
    equal: tuple[tuple[str, str], ...] = ()
    shown: str | None = None  # a readable count (e.g. "249 + 1 quarantined") instead of `rows`


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    title: str
    needs: frozenset[str]
    reads: tuple[Layer, ...]
    writes: tuple[Layer, ...]  # the first is the stage's product: its rows are the layer's count
    hops: tuple[Hop, ...] = ()
    reconciles: bool = False  # checks every hop of the run, then publishes the `latest` keys

    @property
    def notebook(self) -> Path:
        return NOTEBOOKS / f"{self.name}.ipynb"

    @property
    def step(self) -> str:
        """The stage's name without its number: 01_ingest → ingest."""
        return self.name.split("_", 1)[1]

    @property
    def module(self) -> str:
        """What the notebook calls: notebooks/01_ingest.ipynb → lib.stages.ingest."""
        return f"lib.stages.{self.step}"


STAGES: tuple[Stage, ...] = (
    Stage(1, "01_ingest", "REST Countries API → raw (bronze)", frozenset({"api", "store"}),
          reads=(Layer.API,), writes=(Layer.RAW,),
          hops=(Hop("API response", "records", "response_sha256"),)),
    Stage(2, "02_clean", "raw → clean (silver) + quarantine", frozenset({"store"}),
          reads=(Layer.RAW,), writes=(Layer.CLEAN, Layer.QUARANTINE),
          hops=(Hop("raw (bronze)", "raw_records", "raw_sha256", against="API response",
                    equal=(("raw_records", "01_ingest.records"), ("raw_sha256", "01_ingest.response_sha256"))),
                Hop("clean + quarantine (silver)", "silver_records", "clean_fingerprint", against="raw (bronze)",
                    equal=(("silver_records", "raw_records"),), shown="silver_breakdown"))),
    Stage(3, "03_load", "clean → PostgreSQL table (with history)", frozenset({"store", "db"}),
          reads=(Layer.CLEAN,), writes=(Layer.TABLE,),
          hops=(Hop("PostgreSQL rows of this batch", "batch_rows", "batch_fingerprint",
                    against="clean + quarantine (silver)",
                    equal=(("batch_rows", "02_clean.clean_rows"),
                           ("batch_fingerprint", "02_clean.clean_fingerprint"))),
                Hop("PostgreSQL current table", "current_rows", "current_fingerprint"))),
    Stage(4, "04_export", "PostgreSQL → cloud bucket", frozenset({"db", "cloud"}),
          reads=(Layer.TABLE,), writes=(Layer.CLOUD,),
          hops=(Hop("cloud export", "rows", "fingerprint", against="PostgreSQL current table",
                    equal=(("rows", "03_load.current_rows"), ("fingerprint", "03_load.current_fingerprint"))),)),
    Stage(5, "05_gold", "cloud → gold bucket (aggregates, changes, reconciliation)",
          frozenset({"cloud", "store"}), reads=(Layer.CLOUD,), writes=(Layer.GOLD,),
          hops=(Hop("gold", "gold_rows", "gold_fingerprint", against="cloud export",
                    equal=(("gold_rows", "04_export.rows"), ("gold_fingerprint", "04_export.fingerprint"),
                           ("gold_sha256", "04_export.sha256"))),
                # The aggregates' countries and population add up to the table's own count and sum.
                Hop("gold aggregates", "aggregate_countries", "aggregate_population", against="PostgreSQL current table",
                    equal=(("aggregate_countries", "03_load.current_rows"),
                           ("aggregate_population", "03_load.population_total")))),
          reconciles=True),
)
NAMES = tuple(s.name for s in STAGES)
ALL = f"1-{len(STAGES)}"  # the default `--stages`


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise UnknownStage(f"unknown stage {name!r}: stages are {', '.join(NAMES)}")


def by_number(number: int) -> Stage | None:
    return next((s for s in STAGES if s.number == number), None)


def first() -> Stage:
    return STAGES[0]


def writer_of(layer: Layer) -> Stage:
    """The stage that writes a layer."""
    return next(s for s in STAGES if layer in s.writes)


def lineage_columns() -> list[str]:
    """The lineage picture's columns: the sources, then what each stage writes."""
    return [Layer.API.label] + [" / ".join(layer.label for layer in s.writes) for s in STAGES]


def before(name: str) -> tuple[Stage, ...]:
    """The stages that run before `name`."""
    return STAGES[:NAMES.index(name)]


def reconciler() -> Stage:
    return next(s for s in STAGES if s.reconciles)


def needing(service: str, names: list[str]) -> list[str]:
    """Which of the chosen stages need a service."""
    return [n for n in names if service in get(n).needs]
