"""lib.contract: the one declaration of the silver contract, and what is derived from it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from lib import config, contract, source
from lib.config import ROOT


def test_the_key_and_every_column_are_declared_once():
    names = [c.name for c in contract.CONTRACT]
    assert len(names) == len(set(names)) and contract.KEY == names[0]
    assert not contract.column(contract.KEY).nullable
    assert set(contract.LIST_COLUMNS) | set(contract.TEXT_COLUMNS) | set(contract.TYPED_COLUMNS) == set(names)
    assert all(c.kind in contract.KINDS and c.check.name in contract.RULES for c in contract.CONTRACT)


def test_the_default_api_url_asks_for_exactly_the_source_fields_and_passes_the_api_rules():
    url = contract.api_url()
    assert config.DEFAULT_API_URL == url
    fields = parse_qs(urlsplit(url).query)["fields"][0].split(",")
    assert tuple(fields) == contract.SOURCE_FIELDS and len(fields) <= contract.MAX_SOURCE_FIELDS
    assert source.check_url(url) == url


def test_the_contract_table_in_the_docs_is_the_one_derived_from_the_contract():
    doc = (ROOT / "docs" / "data-model.md").read_text(encoding="utf-8")
    assert contract.markdown_table() in doc, "regenerate: python -c 'from lib import contract; print(contract.markdown_table())'"
    assert f"version {contract.VERSION}" in doc


def test_table_rows_list_every_column_with_its_rule():
    rows = contract.table_rows()
    assert [r["column"] for r in rows] == [c.name for c in contract.CONTRACT]
    assert all(r["rule"] for r in rows)


def test_the_source_fields_are_the_ones_the_columns_read_and_the_example_env_asks_for_them():
    assert set(contract.SOURCE_FIELDS) == {c.source.field for c in contract.CONTRACT}
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert f"API_BASE_URL={contract.api_url()}\n" in example


def test_each_rule_and_kind_of_the_contract_has_its_check_and_types_everywhere():
    from lib import formats, quality

    assert set(quality.PREDICATES) == set(contract.RULES)
    for kind in contract.KINDS.values():
        assert formats.arrow_type(kind) is not None and kind.sql and kind.pandas
