"""The weighted histogram observation records exactly what repeated observe() calls would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from goalstream.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0)


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(BUCKETS), st.floats(0, 100, allow_nan=False)),
            st.integers(1, 50),
        ),
        max_size=20,
    )
)
def test_observe_many_equals_repeated_observe(observations: list[tuple[float, int]]) -> None:
    """Bucket counts, count and sum match a loop of observe(), bucket edges included."""
    weighted, looped = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("lat", "l", buckets=BUCKETS, registry=weighted)
    h2 = Histogram("lat", "l", buckets=BUCKETS, registry=looped)
    for value, n in observations:
        observe_many(h1, value, n)
        for _ in range(n):
            h2.observe(value)
    one, two = exposition(weighted), exposition(looped)
    sums = [line for line in one if line.startswith("lat_sum")]
    assert [line for line in one if not line.startswith("lat_sum")] == [
        line for line in two if not line.startswith("lat_sum")
    ]
    assert float(sums[0].split()[1]) == pytest.approx(
        float(next(line for line in two if line.startswith("lat_sum")).split()[1])
    )
