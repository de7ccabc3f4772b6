"""Input events as types: the envelope and its five payloads, decoded by one msgspec decoder.

An entry that breaks the contract (CONTRACT 1) becomes an `Invalid` with a reason, never an
exception that escapes the batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, ClassVar

import msgspec

from goalstream import constants

# Ids of calendars, forms, pipelines etc. come from other services; accept strings or integers
# and compare them as strings.
ExternalId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | int
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Za-z]{3}$")]


def external_id(value: str | int | None) -> str | None:
    """The canonical string form of an id from another service."""
    return None if value is None else str(value)


class TagAdded(msgspec.Struct, frozen=True):
    tag: str


class PaymentCompleted(msgspec.Struct, frozen=True, omit_defaults=True):
    amount: Decimal
    currency: Currency
    product_id: ExternalId | None = None
    payment_id: ExternalId | None = None

    def __post_init__(self) -> None:
        if not self.amount.is_finite() or self.amount < 0:
            raise ValueError("`amount` must be a finite decimal >= 0")


class AppointmentBooked(msgspec.Struct, frozen=True, omit_defaults=True):
    calendar_id: ExternalId
    service_id: ExternalId | None = None
    appointment_id: ExternalId | None = None


class FormSubmitted(msgspec.Struct, frozen=True, omit_defaults=True):
    form_id: ExternalId
    submission_id: ExternalId | None = None


class PipelineStageChanged(msgspec.Struct, frozen=True, omit_defaults=True):
    pipeline_id: ExternalId
    stage_id: ExternalId
    previous_stage_id: ExternalId | None = None


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    """What every event carries; subclasses add a typed `data`."""

    type_name: ClassVar[str]
    id: EventId
    tenant_id: uuid.UUID
    contact_id: uuid.UUID
    occurred_at: AwareDatetime | None = None


class TagAddedEvent(Envelope, frozen=True, kw_only=True, tag=constants.TAG_ADDED):
    type_name = constants.TAG_ADDED
    data: TagAdded


class PaymentCompletedEvent(Envelope, frozen=True, kw_only=True, tag=constants.PAYMENT_COMPLETED):
    type_name = constants.PAYMENT_COMPLETED
    data: PaymentCompleted


class AppointmentBookedEvent(Envelope, frozen=True, kw_only=True, tag=constants.APPOINTMENT_BOOKED):
    type_name = constants.APPOINTMENT_BOOKED
    data: AppointmentBooked


class FormSubmittedEvent(Envelope, frozen=True, kw_only=True, tag=constants.FORM_SUBMITTED):
    type_name = constants.FORM_SUBMITTED
    data: FormSubmitted


class PipelineStageChangedEvent(
    Envelope, frozen=True, kw_only=True, tag=constants.PIPELINE_STAGE_CHANGED
):
    type_name = constants.PIPELINE_STAGE_CHANGED
    data: PipelineStageChanged


Event = (
    TagAddedEvent
    | PaymentCompletedEvent
    | AppointmentBookedEvent
    | FormSubmittedEvent
    | PipelineStageChangedEvent
)
EVENT_TYPES: tuple[str, ...] = constants.DEFAULT_STREAMS
_EVENT_CLASSES: dict[str, type[Envelope]] = {
    cls.type_name: cls
    for cls in (
        TagAddedEvent,
        PaymentCompletedEvent,
        AppointmentBookedEvent,
        FormSubmittedEvent,
        PipelineStageChangedEvent,
    )
}
_DATA_TYPES: dict[str, type[msgspec.Struct]] = {
    constants.TAG_ADDED: TagAdded,
    constants.PAYMENT_COMPLETED: PaymentCompleted,
    constants.APPOINTMENT_BOOKED: AppointmentBooked,
    constants.FORM_SUBMITTED: FormSubmitted,
    constants.PIPELINE_STAGE_CHANGED: PipelineStageChanged,
}


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id (`ms-seq`, or bare `ms`) as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def as_text(value: object) -> str:
    """A Redis reply value (bytes, or already text) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Entry(msgspec.Struct, frozen=True):
    """One stream entry as read from Redis: where it came from and its raw `data` field."""

    stream: str
    entry_id: str
    data: bytes | None
    deliveries: int = 1

    @property
    def millis(self) -> int:
        """The entry id's time part: when Redis accepted the entry, in ms since the epoch."""
        return int(self.entry_id[: self.entry_id.index("-")])


class Decoded(msgspec.Struct, frozen=True):
    """A valid entry: the entry, its event, and when the event happened."""

    entry: Entry
    event: Event
    occurred_at: datetime


class Invalid(msgspec.Struct, frozen=True):
    """An entry that breaks the contract, with the reason it goes to the dead-letter stream."""

    entry: Entry
    reason: str


class EventDecoder:
    """Built once at start-up; turns a batch of entries into valid events and invalid ones."""

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(Event)

    def decode(self, entry: Entry) -> Decoded | Invalid:
        """Decode one entry; never raises."""
        if entry.data is None:
            return Invalid(entry, "entry has no `data` field (or was deleted from the stream)")
        try:
            entry.data.decode("utf-8")  # msgspec lets invalid UTF-8 through in ignored keys
            event = self._decoder.decode(entry.data)
        except UnicodeDecodeError as exc:
            return Invalid(entry, f"malformed JSON: not UTF-8 ({exc.reason} at byte {exc.start})")
        except msgspec.ValidationError as exc:
            return Invalid(entry, f"invalid event: {exc}")
        except msgspec.DecodeError as exc:
            return Invalid(entry, f"malformed JSON: {exc}")
        except RecursionError:
            return Invalid(entry, "malformed JSON: nested too deeply")
        except Exception as exc:  # whatever else a hostile entry finds must not stop the worker
            return Invalid(entry, f"undecodable: {type(exc).__name__}: {exc}")
        occurred = event.occurred_at
        if occurred is None:
            occurred = datetime.fromtimestamp(entry.millis / 1000, tz=UTC)
        return Decoded(entry, event, occurred)

    def decode_batch(self, entries: Sequence[Entry]) -> tuple[list[Decoded], list[Invalid]]:
        """Split a batch into valid events (in stream order) and invalid entries."""
        valid: list[Decoded] = []
        invalid: list[Invalid] = []
        decode = self.decode
        for entry in entries:
            result = decode(entry)
            if type(result) is Decoded:
                valid.append(result)
            else:
                invalid.append(result)  # type: ignore[arg-type]
        return valid, invalid


def event_data_type(event_type: str) -> type[msgspec.Struct]:
    """The payload struct of an event type (for `goalstream publish`)."""
    try:
        return _DATA_TYPES[event_type]
    except KeyError:
        raise ValueError(
            f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}"
        ) from None


def encode_event(
    event_type: str,
    *,
    event_id: str,
    tenant_id: uuid.UUID,
    contact_id: uuid.UUID,
    data: dict[str, object],
    occurred_at: datetime | None = None,
) -> bytes:
    """Validate and encode one event envelope as producers should write it."""
    payload = msgspec.convert(data, event_data_type(event_type))
    cls = _EVENT_CLASSES[event_type]
    event = cls(  # type: ignore[call-arg]
        id=event_id,
        tenant_id=tenant_id,
        contact_id=contact_id,
        occurred_at=occurred_at,
        data=payload,
    )
    return msgspec.json.encode(event)
