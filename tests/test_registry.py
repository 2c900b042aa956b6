"""lib.registry: every stage declared once, consistently, and named nowhere else in the code."""

from __future__ import annotations

import re

import pytest

from lib import registry
from lib.stages import context, parameters
from lib.config import ROOT


def test_every_stage_has_a_notebook_with_a_run_id_parameter_and_known_needs():
    for stage in registry.STAGES:
        assert stage.notebook.is_file(), stage.name
        assert "run_id" in parameters.declared(stage.name), stage.name
        assert stage.needs <= set(registry.SERVICES), stage.name
    assert [s.number for s in registry.STAGES] == list(range(1, len(registry.STAGES) + 1))
    assert registry.ALL == f"1-{len(registry.STAGES)}"


def test_each_layer_has_one_writer_and_is_read_only_after_it_is_written():
    written = [layer for s in registry.STAGES for layer in s.writes]
    assert len(written) == len(set(written))
    for stage in registry.STAGES:
        for layer in stage.reads:
            if layer != "api":
                assert registry.writer_of(layer).number < stage.number, (stage.name, layer)


def test_hops_compare_with_earlier_hops_and_existing_stages():
    seen: list[str] = []
    for stage in registry.STAGES:
        for hop in stage.hops:
            if hop.against:
                assert hop.against in seen, hop.label
            for pair in hop.equal:
                for ref in pair:
                    owner = ref.rpartition(".")[0]
                    assert not owner or registry.get(owner).number <= stage.number, ref
            seen.append(hop.label)
    checker = registry.reconciler()
    assert all(s.number <= checker.number for s in registry.STAGES if s.hops), "a hop after reconciliation"


def test_the_services_a_set_of_stages_needs():
    assert registry.needing("db", list(registry.NAMES)) == ["03_load", "04_export"]
    assert registry.needing("api", ["02_clean", "03_load"]) == []


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(registry.UnknownStage, match="unknown stage '06_extra'"):
        registry.get("06_extra")
    with pytest.raises(registry.UnknownStage):
        context.begin("06_extra")


def test_no_other_module_names_a_stage():
    """Adding a stage must not mean hunting for its neighbours' names through the code."""
    pattern = re.compile("|".join(re.escape(n) for n in registry.NAMES))
    offenders = []
    for path in [*sorted((ROOT / "lib").rglob("*.py")), ROOT / "run_pipeline.py"]:
        if path.name == "registry.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_the_layers_a_stage_writes_name_the_report_and_index_columns():
    from lib import report, review

    assert report.COLUMNS == ["source", "raw", "clean / quarantine", "table", "export", "gold"]
    assert list(review.LAYERS.values()) == ["raw", "clean", "table", "export", "gold"]
    assert all(isinstance(layer, registry.Layer) for s in registry.STAGES for layer in (*s.reads, *s.writes))
    assert registry.writer_of(registry.Layer.QUARANTINE).name == registry.writer_of(registry.Layer.CLEAN).name
