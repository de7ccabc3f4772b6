"""Goal criteria: validation and matching, as CONTRACT section 2 defines them (no servers)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goalstream import constants
from goalstream.evaluate import GoalIndex, evaluate
from goalstream.events import (
    AppointmentBooked,
    Decoded,
    Entry,
    EventDecoder,
    FormSubmitted,
    PaymentCompleted,
    PipelineStageChanged,
    TagAdded,
)
from goalstream.goals import (
    Goal,
    GoalType,
    PurchaseCriteria,
    TagCriteria,
    parse_criteria,
    parse_goal_type,
)

T = GoalType


def pay(amount: str, currency: str = "USD", product_id: str | None = None) -> PaymentCompleted:
    return PaymentCompleted(Decimal(amount), currency, product_id)


MATCH_TABLE: list[tuple[GoalType, dict[str, Any], Any, bool]] = [
    (T.TAG_ADDED, {"tag": "vip"}, TagAdded("vip"), True),
    (T.TAG_ADDED, {"tag": "VIP"}, TagAdded("vip"), True),
    (T.TAG_ADDED, {"tag": "vip"}, TagAdded("Vip"), True),
    (T.TAG_ADDED, {"tag": "vip"}, TagAdded("vip2"), False),
    (T.TAG_ADDED, {"tag": "vip"}, TagAdded(" vip"), False),
    (T.TAG_ADDED, {"tag_pattern": "vip*"}, TagAdded("VIP-gold"), True),
    (T.TAG_ADDED, {"tag_pattern": "vip*"}, TagAdded("vip"), True),
    (T.TAG_ADDED, {"tag_pattern": "vip*"}, TagAdded("a-vip"), False),
    (T.TAG_ADDED, {"tag_pattern": "v?p"}, TagAdded("vAp"), True),
    (T.TAG_ADDED, {"tag_pattern": "v?p"}, TagAdded("vp"), False),
    (T.TAG_ADDED, {"tag_pattern": "a.b"}, TagAdded("axb"), False),
    (T.TAG_ADDED, {"tag_pattern": "[ab]"}, TagAdded("a"), False),
    (T.TAG_ADDED, {"tag_pattern": "[ab]"}, TagAdded("[AB]"), True),
    (T.PURCHASE_MADE, {}, pay("0"), True),
    (T.PURCHASE_MADE, {"min_amount": "10"}, pay("10"), True),
    (T.PURCHASE_MADE, {"min_amount": "10"}, pay("10.00"), True),
    (T.PURCHASE_MADE, {"min_amount": "10"}, pay("9.999"), False),
    (T.PURCHASE_MADE, {"min_amount": 10.5}, pay("10.50"), True),
    (T.PURCHASE_MADE, {"currency": "usd"}, pay("1", "USD"), True),
    (T.PURCHASE_MADE, {"currency": "EUR"}, pay("1", "USD"), False),
    (T.PURCHASE_MADE, {"product_id": "p1"}, pay("1", product_id="p1"), True),
    (T.PURCHASE_MADE, {"product_id": "p1"}, pay("1", product_id="p2"), False),
    (T.PURCHASE_MADE, {"product_id": "p1"}, pay("1"), False),
    (
        T.PURCHASE_MADE,
        {"product_id": "p1", "min_amount": "5", "currency": "USD"},
        pay("5", "usd", "p1"),
        True,
    ),
    (T.APPOINTMENT_BOOKED, {}, AppointmentBooked("cal"), True),
    (T.APPOINTMENT_BOOKED, {"calendar_id": "cal"}, AppointmentBooked("cal"), True),
    (T.APPOINTMENT_BOOKED, {"calendar_id": "cal"}, AppointmentBooked("other"), False),
    (T.APPOINTMENT_BOOKED, {"calendar_id": "7"}, AppointmentBooked(7), True),
    (T.APPOINTMENT_BOOKED, {"service_id": "s"}, AppointmentBooked("cal", "s"), True),
    (T.APPOINTMENT_BOOKED, {"service_id": "s"}, AppointmentBooked("cal"), False),
    (
        T.APPOINTMENT_BOOKED,
        {"calendar_id": "cal", "service_id": "s"},
        AppointmentBooked("cal", "t"),
        False,
    ),
    (T.FORM_SUBMITTED, {"form_id": "f"}, FormSubmitted("f"), True),
    (T.FORM_SUBMITTED, {"form_id": "f"}, FormSubmitted("F"), False),
    (T.FORM_SUBMITTED, {"form_id": "12"}, FormSubmitted(12), True),
    (
        T.PIPELINE_STAGE_REACHED,
        {"pipeline_id": "p", "stage_id": "won"},
        PipelineStageChanged("p", "won"),
        True,
    ),
    (
        T.PIPELINE_STAGE_REACHED,
        {"pipeline_id": "p", "stage_id": "won"},
        PipelineStageChanged("p", "lost", "won"),
        False,
    ),
    (
        T.PIPELINE_STAGE_REACHED,
        {"pipeline_id": "p", "stage_id": "won"},
        PipelineStageChanged("q", "won"),
        False,
    ),
]


@pytest.mark.parametrize(("goal_type", "criteria", "data", "expected"), MATCH_TABLE)
def test_criteria_match_table(
    goal_type: GoalType, criteria: dict[str, Any], data: Any, expected: bool
) -> None:
    """Each goal type matches exactly the events the contract says it matches."""
    assert parse_criteria(goal_type, criteria).matches(data) is expected


INVALID_TABLE: list[tuple[str, Any, str]] = [
    ("tag_added", {}, "exactly one of `tag` or `tag_pattern`"),
    ("tag_added", {"tag": "a", "tag_pattern": "b*"}, "exactly one of `tag` or `tag_pattern`"),
    ("tag_added", {"tag": ""}, "$.tag"),
    ("tag_added", {"tag": "a", "colour": "red"}, "colour"),
    ("purchase_made", {"min_amount": -1}, "min_amount"),
    ("purchase_made", {"min_amount": "NaN"}, "min_amount"),
    ("purchase_made", {"min_amount": "ten"}, "min_amount"),
    ("purchase_made", {"currency": "dollars"}, "currency"),
    ("purchase_made", {"amount": 5}, "amount"),
    ("appointment_booked", {"calendar": "c"}, "calendar"),
    ("form_submitted", {}, "form_id"),
    ("pipeline_stage_reached", {"pipeline_id": "p"}, "stage_id"),
    ("pipeline_stage_reached", {"stage_id": "s"}, "pipeline_id"),
    ("pipeline_stage_reached", [], "criteria"),
]


@pytest.mark.parametrize(("goal_type", "criteria", "field"), INVALID_TABLE)
def test_invalid_criteria_name_the_field(goal_type: str, criteria: Any, field: str) -> None:
    """Invalid criteria are refused with an error that names the offending field."""
    with pytest.raises(ValueError) as info:
        parse_criteria(parse_goal_type(goal_type), criteria)
    assert field in str(info.value)


def test_unknown_goal_type_is_refused() -> None:
    """An unknown goal type is refused, naming `goal_type` and the allowed values."""
    with pytest.raises(ValueError, match=r"goal_type.*tag_added"):
        parse_goal_type("tag_removed")


tags = st.text(min_size=1, max_size=12)


@given(tags)
def test_pattern_without_wildcards_is_an_exact_match(tag: str) -> None:
    """A glob without `*`/`?` matches exactly the tags the exact criterion matches."""
    if "*" in tag or "?" in tag:
        return
    exact = TagCriteria(tag=tag)
    pattern = TagCriteria(tag_pattern=tag)
    for candidate in (tag, tag.upper(), tag.lower(), tag + "x", "x" + tag):
        assert pattern.matches(TagAdded(candidate)) == exact.matches(TagAdded(candidate))


@given(tags, st.data())
def test_question_marks_and_stars_match_what_they_replace(tag: str, data: st.DataObject) -> None:
    """Replacing characters of a tag by `?`, or a slice by `*`, still matches the tag."""
    folded = tag.casefold()
    positions = data.draw(st.sets(st.integers(0, len(folded) - 1)))
    pattern = "".join("?" if i in positions else c for i, c in enumerate(folded))
    assert TagCriteria(tag_pattern=pattern).matches(TagAdded(tag))
    start = data.draw(st.integers(0, len(folded)))
    end = data.draw(st.integers(start, len(folded)))
    star = folded[:start] + "*" + folded[end:]
    assert TagCriteria(tag_pattern=star).matches(TagAdded(tag))
    assert TagCriteria(tag_pattern=star.upper()).matches(TagAdded(tag.lower()))


ascii_tags = st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=12)


@given(ascii_tags)
def test_tag_match_ignores_case(tag: str) -> None:
    """Exact tags and patterns compare case-insensitively in both directions."""
    assert TagCriteria(tag=tag.upper()).matches(TagAdded(tag.lower()))
    assert TagCriteria(tag=tag).matches(TagAdded(tag.swapcase()))
    assert TagCriteria(tag_pattern=tag.swapcase() + "*").matches(TagAdded(tag + "-x"))


amounts = st.decimals(min_value=0, max_value=10**9, allow_nan=False, places=4)


@given(amounts, amounts)
def test_min_amount_is_an_inclusive_decimal_threshold(threshold: Decimal, amount: Decimal) -> None:
    """A purchase meets `min_amount` exactly when amount >= threshold, compared as decimals."""
    criteria = PurchaseCriteria(min_amount=threshold)
    assert criteria.matches(pay(str(amount))) is (amount >= threshold)
    assert criteria.matches(pay(str(threshold)))


@given(amounts)
def test_amount_as_number_or_string_decodes_alike(amount: Decimal) -> None:
    """An amount sent as a JSON number or a numeric string decodes to the same decimal."""
    decoder = EventDecoder()
    base = {
        "id": "e",
        "type": "payment.completed",
        "tenant_id": str(uuid.uuid4()),
        "contact_id": str(uuid.uuid4()),
    }
    as_text = msgspec.json.encode({**base, "data": {"amount": str(amount), "currency": "USD"}})
    as_number = msgspec.json.encode({**base, "data": {"amount": 0, "currency": "USD"}}).replace(
        b'"amount":0', b'"amount":' + str(amount).encode()
    )
    one = decoder.decode(Entry("s", "1-0", as_text))
    two = decoder.decode(Entry("s", "1-0", as_number))
    assert isinstance(one, Decoded) and isinstance(two, Decoded)
    assert one.event.data.amount == two.event.data.amount == amount  # type: ignore[union-attr]


# --- the index finds exactly what a full scan finds ------------------------------------------

TENANTS = [uuid.UUID(int=1), uuid.UUID(int=2)]
WORKFLOWS = [uuid.UUID(int=10), uuid.UUID(int=11)]
VALUES = ["a", "b", "ab", "7"]

criteria_strategy = st.one_of(
    st.builds(lambda v: (T.TAG_ADDED, {"tag": v}), st.sampled_from([*VALUES, "A"])),
    st.builds(lambda v: (T.TAG_ADDED, {"tag_pattern": v}), st.sampled_from(["a*", "?", "*b"])),
    st.builds(
        lambda p, m: (
            T.PURCHASE_MADE,
            {k: v for k, v in (("product_id", p), ("min_amount", m)) if v is not None},
        ),
        st.sampled_from([None, *VALUES]),
        st.sampled_from([None, "0", "5", "10"]),
    ),
    st.builds(
        lambda c: (T.APPOINTMENT_BOOKED, {"calendar_id": c} if c else {}),
        st.sampled_from([None, *VALUES]),
    ),
    st.builds(lambda f: (T.FORM_SUBMITTED, {"form_id": f}), st.sampled_from(VALUES)),
    st.builds(
        lambda p, s: (T.PIPELINE_STAGE_REACHED, {"pipeline_id": p, "stage_id": s}),
        st.sampled_from(VALUES),
        st.sampled_from(VALUES),
    ),
)
goal_strategy = st.builds(
    lambda c, t, w: Goal(
        id=uuid.uuid4(),
        tenant_id=t,
        workflow_id=w,
        goal_type=c[0],
        criteria=parse_criteria(c[0], c[1]),
    ),
    criteria_strategy,
    st.sampled_from(TENANTS),
    st.sampled_from(WORKFLOWS),
)
value = st.sampled_from([*VALUES, 7, "A", "zz"])
data_strategy = st.one_of(
    st.builds(lambda v: (constants.TAG_ADDED, {"tag": str(v)}), value),
    st.builds(
        lambda p, a: (
            constants.PAYMENT_COMPLETED,
            {"amount": a, "currency": "USD", **({"product_id": p} if p else {})},
        ),
        st.sampled_from([None, *VALUES]),
        st.sampled_from(["0", "5", "9.99", "10", "11"]),
    ),
    st.builds(lambda c: (constants.APPOINTMENT_BOOKED, {"calendar_id": c}), value),
    st.builds(lambda f: (constants.FORM_SUBMITTED, {"form_id": f}), value),
    st.builds(
        lambda p, s: (constants.PIPELINE_STAGE_CHANGED, {"pipeline_id": p, "stage_id": s}),
        value,
        value,
    ),
)


@settings(max_examples=200)
@given(
    st.lists(goal_strategy, max_size=30),
    st.lists(st.tuples(data_strategy, st.sampled_from(TENANTS)), min_size=1, max_size=10),
    st.data(),
)
def test_index_finds_what_a_full_scan_finds(
    goals: list[Goal], events: list[Any], data: st.DataObject
) -> None:
    """Lookups by key plus scans find exactly the goals a brute-force scan matches."""
    index = GoalIndex(goals)
    removed = data.draw(st.sets(st.sampled_from([g.id for g in goals]))) if goals else set()
    for goal_id in removed:
        index.discard(goal_id)
    live = [g for g in goals if g.id not in removed]
    assert len(index) == len(live)
    decoder = EventDecoder()
    decoded = []
    for (event_type, payload), tenant in events:
        raw = msgspec.json.encode(
            {
                "id": "e",
                "type": event_type,
                "tenant_id": str(tenant),
                "contact_id": str(uuid.uuid4()),
                "data": payload,
            }
        )
        result = decoder.decode(Entry("s", "1-0", raw))
        assert isinstance(result, Decoded)
        decoded.append(result)
    found = {(pos, g.id) for pos, g in evaluate(decoded, index)}
    expected = {
        (pos, g.id)
        for pos, d in enumerate(decoded)
        for g in live
        if g.tenant_id == d.event.tenant_id
        and g.event_type == d.event.type_name
        and g.criteria.matches(d.event.data)  # type: ignore[arg-type]
    }
    assert found == expected


def glob_by_regex(pattern: str, text: str) -> bool:
    """The reference meaning of a glob: `*` any run, `?` any one character, all else literal."""
    import re

    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


@settings(max_examples=500)
@given(st.text(alphabet="ab*?", max_size=8), st.text(alphabet="ab", max_size=8))
def test_glob_matcher_agrees_with_the_reference(pattern: str, text: str) -> None:
    """The linear glob matcher means exactly what the regex reference means."""
    from goalstream.goals import glob_match

    assert glob_match(pattern, text) == glob_by_regex(pattern, text)


def test_hostile_pattern_does_not_backtrack_forever() -> None:
    """A pattern that sends a backtracking regex into exponential time is answered at once
    (the suite's timeout would stop a regression)."""
    hostile = TagCriteria(tag_pattern="*a" * 12 + "*b")
    assert not hostile.matches(TagAdded("a" * 5000))
    assert hostile.matches(TagAdded("a" * 5000 + "b"))
