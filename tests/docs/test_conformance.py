"""docs/conformance.md against the code: each claim that the code or configuration decides.

The statement's tables sit between ``<!-- name -->`` and ``<!-- end -->`` markers; each
test reads one and compares it with what the node does (the AE it builds, the objects it
writes, the contexts it proposes, the routes and statuses of its STOW-RS service), and
every configuration key the statement names must exist.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

import service.dicomweb.stow as stow_module
from service import receiver
from service.config import Destination as DestinationSettings
from service.config import (
    DicomSettings,
    OutputsSettings,
    ScOutputSettings,
    SegOutputSettings,
    SenderSettings,
    Settings,
)
from service.dicomweb import stow_response
from service.dicomweb.settings import DicomwebSettings
from service.dicomweb.stow import StowService
from service.outputs.charset import output_character_set
from service.pipeline import OutputOptions, PipelineResult, analyse_series
from service.sender import Sender
from service.ul_pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from tests.conftest import free_port
from tests.service.dicom_fixtures import make_card
from tests.service.test_pipeline import FakeEngine, write_fake_engine_series

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
TEXT = DOC.read_text(encoding="utf-8")


def table(name: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule dropped) of the table marked `name`."""
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- end -->", TEXT, re.S)
    assert match, f"no table {name} in {DOC.name}"
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in match.group(1).strip().splitlines()
    ]
    return rows[2:]


def code(cell: str) -> str:
    """The text in backticks of a cell."""
    found = re.findall(r"`([^`]*)`", cell)
    assert found, f"no `value` in {cell!r}"
    return found[0]


def column(name: str, index: int) -> list[str]:
    return [code(row[index]) for row in table(name)]


# ---------------------------------------------------------------- Storage SCP


@pytest.fixture(scope="module")
def scp_contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """What the running listener accepts: each SOP class with each transfer syntax
    proposed in a context of its own, over a real association (MR is the control)."""
    from service.config import StorageSettings
    from service.store import JobStore, RetryPolicy, run_migrations

    tmp = tmp_path_factory.mktemp("conformance-scp")
    url = f"sqlite:///{tmp / 'unict.db'}"
    run_migrations(url)
    store = JobStore(url, retry=RetryPolicy())
    listener = receiver.Receiver(
        DicomSettings(port=0, allowed_callers=("CONFORMANCE",)),
        StorageSettings(spool_dir=tmp / "spool", min_free_mb=0),
        store,
    )
    syntaxes = [*receiver.SUPPORTED_TRANSFER_SYNTAXES, *receiver._COMPRESSED_LOSSLESS]
    names = list(dict.fromkeys(str(s) for s in syntaxes))
    classes = [*receiver.SUPPORTED_SOP_CLASSES, str(Verification), "1.2.840.10008.5.1.4.1.1.4"]
    listener.start()
    try:
        ae = AE(ae_title="CONFORMANCE")
        for sop_class in classes:
            for syntax in names:
                ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="UNICT")
        assert assoc.is_established
        accepted: dict[str, set[str]] = {}
        for context in assoc.accepted_contexts:
            accepted.setdefault(str(context.abstract_syntax), set()).add(
                str(context.transfer_syntax[0])
            )
        assoc.release()
    finally:
        listener.stop()
        store.close()
    # In the listener's order of preference (the order the statement lists them).
    return {sop_class: [s for s in names if s in found] for sop_class, found in accepted.items()}


def test_scp_sop_classes_are_the_ones_the_ae_accepts(
    scp_contexts: dict[str, list[str]],
) -> None:
    listed = set(column("scp-sop-classes", 1))
    assert listed == set(scp_contexts)
    assert listed == {*receiver.SUPPORTED_SOP_CLASSES, str(Verification)}


def test_scp_transfer_syntaxes_are_the_ones_the_ae_accepts(
    scp_contexts: dict[str, list[str]],
) -> None:
    always = column("scp-transfer-syntaxes", 1)
    compressed = column("scp-compressed-transfer-syntaxes", 1)
    accepted = [str(s) for s in receiver.SUPPORTED_TRANSFER_SYNTAXES]
    assert accepted[: len(always)] == always
    assert set(accepted[len(always) :]) <= set(compressed)
    assert compressed == [str(s) for s in receiver._COMPRESSED_LOSSLESS]
    # The test environment installs the decoders extra: every listed syntax is offered.
    assert set(accepted) == set(always) | set(compressed)
    for sop_class in receiver.SUPPORTED_SOP_CLASSES:
        assert scp_contexts[sop_class] == accepted


def test_scp_association_policies_are_the_defaults() -> None:
    rows = {row[0]: row for row in table("scp-association-policies")}
    defaults = DicomSettings(allowed_callers=("X",))
    assert code(rows["AE title"][1]) == defaults.ae_title
    assert int(code(rows["simultaneous associations"][1])) == defaults.max_associations
    assert int(code(rows["maximum PDU received"][1])) == defaults.max_pdu
    assert float(code(rows["ARTIM (association request) timeout, s"][1])) == defaults.acse_timeout_s
    assert code(rows["Implementation Class UID"][1]) == IMPLEMENTATION_CLASS_UID
    assert code(rows["Implementation Version Name"][1]) == IMPLEMENTATION_VERSION
    assert float(code(rows["idle association timeout, s"][1])) == defaults.network_timeout_s
    # As SCU (sending results, C-FIND) the node is pynetdicom.
    assert code(rows["Implementation Class UID (SCU)"][1]) == PYNETDICOM_IMPLEMENTATION_UID
    assert code(rows["Implementation Version Name (SCU)"][1]) == PYNETDICOM_IMPLEMENTATION_VERSION
    assert AE().implementation_class_uid == PYNETDICOM_IMPLEMENTATION_UID


def test_scp_statuses_are_the_receivers() -> None:
    listed = {int(code(row[0]), 16) for row in table("scp-statuses")}
    assert listed == {
        receiver.STATUS_SUCCESS,
        receiver.STATUS_OUT_OF_RESOURCES,
        receiver.STATUS_DATASET_MISMATCH,
        receiver.STATUS_CANNOT_UNDERSTAND,
        receiver.STATUS_SOP_CLASS_NOT_SUPPORTED,
    }


# ---------------------------------------------------------------- objects and SCU


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PipelineResult]:
    """The pipeline's outputs on the test chest: BINARY with key images, and LABELMAP."""
    series = write_fake_engine_series(tmp_path_factory.mktemp("conformance"))
    card = make_card()
    return {
        "BINARY": analyse_series(
            series,
            FakeEngine(card),
            card,
            OutputOptions(OutputsSettings(sc=ScOutputSettings(enabled=True, max_images=1))),
        ),
        "LABELMAP": analyse_series(
            series,
            FakeEngine(card),
            card,
            OutputOptions(OutputsSettings(seg=SegOutputSettings(segmentation_type="LABELMAP"))),
        ),
    }


def all_outputs(result: PipelineResult) -> Iterator[Dataset]:
    yield from (d for d in (result.seg, result.sr) if d is not None)
    yield from result.sc


def test_scu_sop_classes_are_the_ones_written(outputs: dict[str, PipelineResult]) -> None:
    rows = {row[0]: code(row[1]) for row in table("scu-sop-classes")}
    binary, labelmap = outputs["BINARY"], outputs["LABELMAP"]
    assert binary.seg is not None and labelmap.seg is not None and binary.sr is not None
    assert str(binary.seg.SOPClassUID) == rows["Segmentation Storage"]
    assert str(labelmap.seg.SOPClassUID) == rows["Label Map Segmentation Storage"]
    assert str(binary.sr.SOPClassUID) == rows["Comprehensive 3D SR Storage"]
    assert {str(d.SOPClassUID) for d in binary.sc} == {rows["Secondary Capture Image Storage"]}
    find = rows["Study Root Query/Retrieve Information Model — FIND"]
    assert find == str(StudyRootQueryRetrieveInformationModelFind)
    written = {str(d.SOPClassUID) for r in outputs.values() for d in all_outputs(r)}
    assert written == set(rows.values()) - {find}


def test_sr_template_and_content_qualification(outputs: dict[str, PipelineResult]) -> None:
    ((resource, template),) = [(code(a), code(b)) for a, b in table("sr-template")]
    sr = outputs["BINARY"].sr
    assert sr is not None
    (item,) = sr.ContentTemplateSequence
    assert (item.MappingResource, item.TemplateIdentifier) == (resource, template)
    for ds in all_outputs(outputs["BINARY"]):
        if "ContentQualification" in ds:
            assert ds.ContentQualification == "RESEARCH"
    seg = outputs["BINARY"].seg
    assert seg is not None and seg.ContentQualification == "RESEARCH"
    assert sr.ContentQualification == "RESEARCH"


def test_scu_proposes_the_listed_transfer_syntaxes(outputs: dict[str, PipelineResult]) -> None:
    proposed: dict[str, list[str]] = {}

    def on_requested(event: evt.Event) -> None:
        for context in event.assoc.requestor.requested_contexts:
            proposed[str(context.abstract_syntax)] = [str(s) for s in context.transfer_syntax]

    scp = AE(ae_title="PACS")
    result = outputs["BINARY"]
    datasets = list(all_outputs(result))
    for ds in datasets:
        scp.add_supported_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, lambda e: 0x0000)],
    )
    try:
        sender = Sender(
            [DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)],
            SenderSettings(max_attempts=1, timeout_s=30),
            calling_ae="UNICT",
        )
        results = sender.send(datasets)
    finally:
        server.shutdown()
    assert all(r.ok for r in results)
    listed = column("scu-transfer-syntaxes", 1)
    assert set(proposed) == {str(d.SOPClassUID) for d in datasets}
    assert all(syntaxes == listed for syntaxes in proposed.values())


# ---------------------------------------------------------------- character sets


@pytest.mark.parametrize("row", table("character-sets"), ids=lambda r: r[0])
def test_character_sets(row: list[str]) -> None:
    source_cell, output_cell = row
    source = Dataset()
    if source_cell.startswith("`"):
        value = code(source_cell)
        source.SpecificCharacterSet = value.split("\\") if "\\" in value else value
    elif source_cell.startswith("a value highdicom does not accept"):
        source.SpecificCharacterSet = "ISO_IR 999"
    result = output_character_set(source)
    if output_cell.startswith("absent"):
        assert result is None
    else:
        expected = code(output_cell)
        assert result == (expected.split("\\") if "\\" in expected else expected)


# ---------------------------------------------------------------- STOW-RS


class _Target:
    spool_dir = Path("/nonexistent")

    def store_file(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    def connection_ended(self, connection: int, *, released: bool) -> None:
        raise AssertionError("not called")


def test_stow_resources_are_the_routes() -> None:
    service = StowService(_Target(), DicomwebSettings())
    routes = {(method, r.path) for r in service.routes() for method in (r.methods or ()) - {"HEAD"}}
    listed = {
        (code(m), code(p).replace("{StudyInstanceUID}", "{study}"))
        for m, p in table("stow-resources")
    }
    assert routes == listed


def test_stow_http_statuses_are_the_ones_the_handler_answers() -> None:
    source = inspect.getsource(stow_module)
    answered = {int(s) for s in re.findall(r"_(?:error|dataset)\(\s*(\d{3})", source)}
    answered |= {200, 202, 409}  # stow_response.http_status
    assert {stow_response.http_status([]), 409} == {409}
    listed = {int(code(row[0])) for row in table("stow-http-statuses")}
    assert listed == answered


def test_stow_failure_reasons_are_the_ones_sent() -> None:
    listed = {int(code(row[0]), 16) for row in table("stow-failure-reasons")}
    # What the receiver refuses with, as the STOW-RS handler reports it (C210 -> C000).
    refusals = {
        receiver.STATUS_OUT_OF_RESOURCES,
        receiver.STATUS_DATASET_MISMATCH,
        stow_response.FAILURE_CANNOT_UNDERSTAND,
        receiver.STATUS_SOP_CLASS_NOT_SUPPORTED,
        receiver.STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
    }
    assert listed == refusals


# ---------------------------------------------------------------- configuration keys


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through tuples, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin in (tuple, list, dict, typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    return []


def _resolves(path: list[str], models: list[type[BaseModel]]) -> bool:
    if not path:
        return True
    key = path[0].removesuffix("[]")
    for model in models:
        field = model.model_fields.get(key) or next(
            (f for f in model.model_fields.values() if f.alias == key), None
        )
        if field is not None and _resolves(path[1:], _models(field.annotation)):
            return True
    return False


def test_every_configuration_key_named_exists() -> None:
    sections = set(Settings.model_fields) | {"json"}
    keys = [
        k
        for k in re.findall(r"`([a-z_]+(?:\[\])?(?:\.[a-z_0-9]+)+)`", TEXT)
        if k.split(".")[0].removesuffix("[]") in sections
    ]
    assert len(keys) > 30
    missing = [k for k in keys if not _resolves(k.split("."), [Settings])]
    assert missing == []
