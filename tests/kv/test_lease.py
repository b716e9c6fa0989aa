"""KV lease state machine and lease table."""

from __future__ import annotations

import pytest

from disagg.kv.lease import KVLease, KVState, LeaseTable


class FakeClock:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def make_lease(state: KVState = KVState.RESERVED) -> KVLease:
    return KVLease(lease_id="lease-7", request_id="req-7", deadline_s=10.0, payload=[3, 4], state=state)


# (action, from state, to state) for every legal transition.
LEGAL = [
    ("mark_written", KVState.RESERVED, KVState.WRITTEN),
    ("start_read", KVState.WRITTEN, KVState.READING),
    ("read_failed", KVState.READING, KVState.WRITTEN),
    ("release", KVState.RESERVED, KVState.RELEASED),
    ("release", KVState.WRITTEN, KVState.RELEASED),
    ("release", KVState.READING, KVState.RELEASED),
    ("expire", KVState.RESERVED, KVState.EXPIRED),
    ("expire", KVState.WRITTEN, KVState.EXPIRED),
    ("expire", KVState.READING, KVState.EXPIRED),
]
ACTIONS = ["mark_written", "start_read", "read_failed", "release", "expire"]
ILLEGAL = [
    (action, state)
    for action in ACTIONS
    for state in KVState
    if not any(action == legal_action and state == source for legal_action, source, _ in LEGAL)
]


@pytest.mark.parametrize("action,source,target", LEGAL)
def test_legal_transition(action: str, source: KVState, target: KVState) -> None:
    lease = make_lease(source)

    getattr(lease, action)()

    assert lease.state is target


@pytest.mark.parametrize("action,source", ILLEGAL)
def test_illegal_transition_raises(action: str, source: KVState) -> None:
    lease = make_lease(source)

    with pytest.raises(RuntimeError) as excinfo:
        getattr(lease, action)()

    message = str(excinfo.value)
    assert "lease-7" in message
    assert "req-7" in message
    assert source.name in message
    assert action in message
    assert lease.state is source


def test_illegal_transition_count() -> None:
    # 5 actions x 5 states, 9 of them legal.
    assert len(ILLEGAL) == 16


def test_illegal_message_names_target_state() -> None:
    lease = make_lease(KVState.RESERVED)

    with pytest.raises(RuntimeError, match="RESERVED -> READING"):
        lease.start_read()


def test_full_handoff_with_retry() -> None:
    lease = make_lease()

    lease.mark_written()
    lease.start_read()
    lease.read_failed()
    lease.start_read()
    lease.release()

    assert lease.state is KVState.RELEASED
    assert lease.is_terminal


def test_table_add_sets_times_from_clock() -> None:
    clock = FakeClock(100.0)
    table = LeaseTable(clock=clock)

    lease = table.add("req-1", [0, 1, 2], ttl_s=5.0)

    assert lease.request_id == "req-1"
    assert lease.state is KVState.RESERVED
    assert lease.created_s == 100.0
    assert lease.deadline_s == 105.0
    assert lease.payload == [0, 1, 2]
    assert table.get("req-1") is lease
    assert table.num_active == 1
    table.check_integrity()


def test_table_lease_ids_unique() -> None:
    table = LeaseTable(clock=FakeClock())

    first = table.add("req-1", None, ttl_s=1.0)
    second = table.add("req-2", None, ttl_s=1.0)

    assert first.lease_id != second.lease_id


def test_table_add_duplicate_request_raises() -> None:
    table = LeaseTable(clock=FakeClock())
    table.add("req-1", [0], ttl_s=1.0)

    with pytest.raises(ValueError, match="req-1"):
        table.add("req-1", [1], ttl_s=1.0)

    assert table.get("req-1").payload == [0]


@pytest.mark.parametrize("ttl_s", [0.0, -1.0])
def test_table_add_rejects_non_positive_ttl(ttl_s: float) -> None:
    table = LeaseTable(clock=FakeClock())

    with pytest.raises(ValueError, match="ttl_s"):
        table.add("req-1", [0], ttl_s=ttl_s)

    assert table.num_active == 0


def test_table_get_unknown_returns_none() -> None:
    assert LeaseTable(clock=FakeClock()).get("nope") is None


@pytest.mark.parametrize("state_steps", [[], ["mark_written"], ["mark_written", "start_read"]])
def test_table_release_returns_payload_once(state_steps: list[str]) -> None:
    table = LeaseTable(clock=FakeClock())
    lease = table.add("req-1", [5, 6], ttl_s=1.0)
    for step in state_steps:
        getattr(lease, step)()

    first = table.release("req-1")
    second = table.release("req-1")

    assert first == [5, 6]
    assert second is None
    assert lease.state is KVState.RELEASED
    assert table.get("req-1") is None
    assert table.num_active == 0
    table.check_integrity()


def test_table_release_unknown_returns_none() -> None:
    table = LeaseTable(clock=FakeClock())

    assert table.release("never-added") is None


def test_table_release_after_external_release_raises() -> None:
    table = LeaseTable(clock=FakeClock())
    lease = table.add("req-1", [0], ttl_s=1.0)
    lease.release()

    with pytest.raises(RuntimeError, match="RELEASED -> RELEASED"):
        table.release("req-1")


def test_expire_due_in_deadline_order() -> None:
    clock = FakeClock(100.0)
    table = LeaseTable(clock=clock)
    table.add("late", ["c"], ttl_s=30.0)
    table.add("early", ["a"], ttl_s=10.0)
    table.add("middle", ["b"], ttl_s=20.0).mark_written()
    table.add("alive", ["d"], ttl_s=50.0)

    expired = table.expire_due(now_s=130.0)

    assert [lease.request_id for lease in expired] == ["early", "middle", "late"]
    assert [lease.payload for lease in expired] == [["a"], ["b"], ["c"]]
    assert all(lease.state is KVState.EXPIRED for lease in expired)
    assert table.num_active == 1
    assert table.get("alive").state is KVState.RESERVED
    table.check_integrity()


def test_expire_due_uses_clock_by_default() -> None:
    clock = FakeClock(100.0)
    table = LeaseTable(clock=clock)
    table.add("req-1", [0], ttl_s=5.0)

    clock.now_s = 104.999
    assert table.expire_due() == []

    clock.now_s = 105.0
    expired = table.expire_due()

    assert [lease.request_id for lease in expired] == ["req-1"]


def test_expire_due_includes_reading_lease() -> None:
    table = LeaseTable(clock=FakeClock(0.0))
    lease = table.add("req-1", [0], ttl_s=1.0)
    lease.mark_written()
    lease.start_read()

    expired = table.expire_due(now_s=2.0)

    assert expired == [lease]
    assert lease.state is KVState.EXPIRED


def test_release_after_expiry_returns_none() -> None:
    table = LeaseTable(clock=FakeClock(0.0))
    table.add("req-1", [9], ttl_s=1.0)
    expired = table.expire_due(now_s=1.0)

    assert expired[0].payload == [9]
    assert table.release("req-1") is None
    assert table.expire_due(now_s=100.0) == []


def test_request_id_reusable_after_release() -> None:
    table = LeaseTable(clock=FakeClock())
    table.add("req-1", [0], ttl_s=1.0)
    table.release("req-1")

    lease = table.add("req-1", [1], ttl_s=1.0)

    assert lease.state is KVState.RESERVED
    assert table.release("req-1") == [1]


def test_finished_history_is_bounded() -> None:
    table = LeaseTable(clock=FakeClock(), max_finished=2)
    for index in range(3):
        table.add(f"req-{index}", [index], ttl_s=1.0)
        table.release(f"req-{index}")

    assert list(table._finished) == ["req-1", "req-2"]


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda table: table.get("req-1").expire(), "EXPIRED but still active"),
        (lambda table: setattr(table.get("req-1"), "request_id", "other"), "filed under"),
        (lambda table: setattr(table.get("req-1"), "lease_id", table.get("req-2").lease_id), "used twice"),
        (lambda table: setattr(table.get("req-1"), "deadline_s", 0.0), "before its creation"),
    ],
)
def test_check_integrity_detects_corruption(corrupt, match: str) -> None:
    table = LeaseTable(clock=FakeClock(100.0))
    table.add("req-1", [0], ttl_s=1.0)
    table.add("req-2", [1], ttl_s=1.0)
    table.check_integrity()

    corrupt(table)

    with pytest.raises(RuntimeError, match=match):
        table.check_integrity()
