"""SQLAlchemy models of the job store: series versions, their instances, and jobs.

A *series version* is one set of instances analysed together. Version 1 starts with the
first instance of a series; an instance that arrives after that version's job left
``RECEIVING`` (or that changes an instance's content) starts the next version, which
carries the previous instances over and gets its own job. One job per series version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.store.states import JobState

__all__ = ["Base", "Instance", "Job", "Series", "UTCDateTime", "metadata"]

# Stable constraint names, so that migrations can refer to them on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Series(Base):
    """One version of a received series."""

    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("series_instance_uid", "version", name="uq_series_uid_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    expected_count: Mapped[int | None] = mapped_column(Integer)
    expected_count_source: Mapped[str | None] = mapped_column(String(32))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[datetime | None]

    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.id", cascade="all, delete-orphan"
    )
    job: Mapped[Job | None] = relationship(back_populates="series", uselist=False)


class Instance(Base):
    """One stored SOP instance of a series version (the file is in the spool)."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("series_id", "sop_instance_uid", name="uq_instances_series_sop"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime]
    header: Mapped[dict[str, Any]]
    """The header attributes the selection rules and the worker read (no patient data)."""

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """The analysis of one series version."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_next_retry_at", "state", "next_retry_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), unique=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, validate_strings=True)
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    next_retry_at: Mapped[datetime | None]
    error_stage: Mapped[str | None] = mapped_column(String(32))
    error_reason: Mapped[str | None] = mapped_column(Text)
    rejected_rule: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any]]
    """Seconds per stage, e.g. ``{"infer": 3.2, "send": 0.4}``."""
    outputs: Mapped[dict[str, Any]]
    """``{"sent": [{"destination", "sop_instance_uid", "status", ...}, ...]}``."""
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    spool_removed_at: Mapped[datetime | None]
    """When the retention cleaner removed its spooled files (``None``: still kept)."""

    series: Mapped[Series] = relationship(back_populates="job")
