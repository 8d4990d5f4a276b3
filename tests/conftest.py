"""Shared fixtures: free ports, strict pydicom, tiny CT series, job stores, a fake clock.

The job store fixtures run on SQLite, and on PostgreSQL when ``UNICT_TEST_POSTGRES_URL``
names a reachable server (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``);
each PostgreSQL test gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from service import pynetdicom_race

POSTGRES_ENV = "UNICT_TEST_POSTGRES_URL"

# The tests' own pynetdicom senders get the node's fix for pynetdicom's requestor race (a
# fast response taken by the reactor thread and dropped; service/pynetdicom_race.py).
pynetdicom_race.install()


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class FakeClock:
    """A settable UTC clock for the job store, assembler and workers."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class CTSeries:
    """A synthetic CT series written to disk."""

    study_uid: str
    series_uid: str
    paths: tuple[Path, ...]
    datasets: tuple[Dataset, ...]


def make_ct_dataset(
    *,
    study_uid: str,
    series_uid: str,
    index: int,
    rows: int = 16,
    columns: int = 16,
    thickness: float = 1.0,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    images_in_acquisition: int | None = None,
    description: str = "Chest 1.0 B30f",
) -> Dataset:
    """One small but complete CT Image Storage instance (synthetic patient)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20250101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = "UniCT tests"
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.InstanceNumber = index + 1
    ds.ImageType = list(image_type)
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * thickness]
    ds.SliceThickness = thickness
    ds.PixelSpacing = [0.7, 0.7]
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    pixels = np.full((rows, columns), index, dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture
def ct_series(tmp_path: Path) -> Callable[..., CTSeries]:
    """Factory: ``ct_series(n, **make_ct_dataset_options)`` writes a series to a tmp folder."""

    def make(n: int = 5, **options: Any) -> CTSeries:
        study_uid = options.pop("study_uid", None) or generate_uid()
        series_uid = options.pop("series_uid", None) or generate_uid()
        folder = tmp_path / f"series-{series_uid}"
        folder.mkdir()
        datasets, paths = [], []
        for i in range(n):
            ds = make_ct_dataset(study_uid=study_uid, series_uid=series_uid, index=i, **options)
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            datasets.append(ds)
            paths.append(path)
        return CTSeries(study_uid, series_uid, tuple(paths), tuple(datasets))

    return make


# --------------------------------------------------------------------------- session


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom() -> Iterator[None]:
    """Validate while reading and writing, as highdicom's suite does."""
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = pydicom.config.RAISE
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


# --------------------------------------------------------------------------- databases


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"{POSTGRES_ENV} is not set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search path is a fresh schema, dropped after the test."""
    import sqlalchemy as sa

    base = _postgres_url()
    engine = sa.create_engine(base, poolclass=sa.pool.NullPool)
    schema = f"unict_test_{uuid.uuid4().hex[:12]}"
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL at {POSTGRES_ENV} unreachable: {exc.orig}")
    url = sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL, on SQLite and (when configured) PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'unict.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An empty SQLite database URL in the test's tmp folder."""
    return f"sqlite:///{tmp_path / 'db' / 'unict.db'}"


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at 2025-01-01 12:00 UTC."""
    return FakeClock()


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[Any]:
    """A migrated :class:`JobStore` on each database backend, with the fake clock."""
    from service.store import JobStore, RetryPolicy, run_migrations

    run_migrations(db_url)
    job_store = JobStore(db_url, clock=clock, retry=RetryPolicy(max_attempts=3, backoff_s=10))
    yield job_store
    job_store.close()


@pytest.fixture
def sqlite_store(sqlite_url: str, clock: FakeClock) -> Iterator[Any]:
    """A migrated SQLite :class:`JobStore` with the fake clock."""
    from service.store import JobStore, RetryPolicy, run_migrations

    run_migrations(sqlite_url)
    job_store = JobStore(sqlite_url, clock=clock, retry=RetryPolicy(max_attempts=3, backoff_s=10))
    yield job_store
    job_store.close()


# --------------------------------------------------------------------------- Orthanc


@dataclass(frozen=True)
class OrthancFixture:
    """A running Orthanc, and the port reserved for our node in its DicomModalities."""

    server: Any  # tests.orthanc.OrthancServer
    node_port: int
    node_aet: str = "UNICT"
    modality: str = "unict"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancFixture]:
    """One real Orthanc for the session (SIGTERM takes seconds: start it once)."""
    from tests.orthanc import ORTHANC_BINARY, orthanc_server

    if not ORTHANC_BINARY.exists():
        pytest.skip(f"{ORTHANC_BINARY} not installed (apt-get install orthanc orthanc-dicomweb)")
    node_port = free_port()
    with orthanc_server(
        tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"unict": ("UNICT", "127.0.0.1", node_port)},
    ) as server:
        yield OrthancFixture(server, node_port)


# pynetdicom 3.0.4 leaks the socket of a refused connection (AssociationSocket.connect calls
# shutdown() on the unconnected socket, which raises, so close() is skipped). Tests that
# connect to a closed port on purpose mark themselves with this and call collect_garbage()
# so the ResourceWarning surfaces, and is ignored, inside the test that caused it.
ignores_pynetdicom_socket_leak = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


def collect_garbage() -> None:
    """Run the garbage collector now (see ``ignores_pynetdicom_socket_leak``)."""
    import gc

    gc.collect()
