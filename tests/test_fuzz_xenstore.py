"""Stateful fuzzing: a malicious guest against xenstored, through its ring page.

The guest writes raw bytes and well-formed messages of every type into its request ring,
scribbles on the indices, reads replies or not, and kicks.  Properties after every step:
nothing escapes ``process()``; what xenstored holds for the guest stays under its quotas
(nodes, watches, transactions, nodes per transaction) and its queued output under a fixed
bound; a bystander domain's writes still succeed and dom0 still gets the bystander's watch
event.  Bounded for ``make test``; ``PVIO_FUZZ=1`` (``make fuzz``) runs many more examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pvio.xenstore.server import OUTPUT_HIGH_WATER, OUTPUT_LIMIT, RingConnection
from pvio.xenstore.store import Store
from pvio.xenstore.wire import (
    OFFSET_REQ,
    OFFSET_REQ_CONS,
    OFFSET_REQ_PROD,
    OFFSET_RSP,
    OFFSET_RSP_CONS,
    OFFSET_RSP_PROD,
    XENSTORE_PAYLOAD_MAX,
    XSD_SOCKMSG,
    ByteRing,
    XsType,
    as_page,
    encode_message,
)
from tests.test_xenstore_hostile import STATE, Dom0Ring

FUZZ = os.environ.get("PVIO_FUZZ") == "1"
MESSAGE_MAX = XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX

PATHS = st.sampled_from(
    ["a", "a/b", "device/vif/0/state", "/local/domain/2/x", "/local/domain/1", "@introduceDomain", "", "a//b"]
).map(str.encode) | st.binary(max_size=40)
PAYLOADS = st.one_of(
    st.tuples(PATHS, st.binary(max_size=20)).map(lambda t: t[0] + b"\0" + t[1]),
    PATHS.map(lambda p: p + b"\0"),
    st.tuples(PATHS, PATHS).map(lambda t: t[0] + b"\0" + t[1] + b"\0"),
    st.sampled_from([b"T\0", b"F\0", b"0\0", b"1\0"]),
    st.binary(max_size=64),
)


class HostileGuest(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store()
        for domid in (1, 2):
            self.store.introduce_domain(domid)
        self.page = as_page(bytearray(4096))
        self.conn = RingConnection(self.store, 1, self.page, notify=lambda: None)
        self.req = ByteRing(self.page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self.rsp = ByteRing(self.page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        self.req_prod = 0
        self.bystander = self.store.connect(2)
        self.dom0 = Dom0Ring(self.store)
        self.bystander.write(STATE, "1")
        self.dom0.watch(f"/local/domain/2/{STATE}", "fe2")
        self.dom0.drain()
        self.rounds = 0

    def _push(self, data: bytes) -> None:
        room = 1024 - ((self.req_prod - self.req.load_cons()) & 0xFFFFFFFF)
        data = data[: max(room, 0)]
        self.req.copy_in(self.req_prod, data)
        self.req_prod = (self.req_prod + len(data)) & 0xFFFFFFFF
        self.req.store_prod(self.req_prod)

    @rule(data=st.binary(max_size=1100))
    def raw_bytes(self, data: bytes) -> None:
        self._push(data)

    @rule(
        msg_type=st.sampled_from([int(t) for t in XsType]) | st.integers(0, 40),
        req_id=st.integers(0, 3),
        tx_id=st.integers(0, 3),
        payload=PAYLOADS,
        copies=st.integers(1, 30),
    )
    def message(self, msg_type: int, req_id: int, tx_id: int, payload: bytes, copies: int) -> None:
        for _ in range(copies):
            self._push(encode_message(msg_type, req_id, tx_id, payload))
            self.conn.process()

    @rule(value=st.integers(0, 2**32 - 1))
    def scribble_req_prod(self, value: int) -> None:
        self.req.store_prod(value)

    @rule(value=st.integers(0, 2**32 - 1))
    def scribble_rsp_cons(self, value: int) -> None:
        self.rsp.store_cons(value)

    @rule()
    def read_replies(self) -> None:
        self.rsp.store_cons(self.rsp.load_prod())

    @rule()
    def kick(self) -> None:
        self.conn.process()  # must never raise

    @invariant()
    def the_guest_is_bounded(self) -> None:
        counters = self.store.counters(1)
        quota = self.store.quota_for(1)
        assert counters["nodes"] <= quota.nodes
        assert counters["watches"] <= quota.watches
        assert counters["transactions"] <= quota.transactions
        for tx in self.conn._session._transactions.values():
            assert len(tx.seen) <= quota.transaction_nodes
        assert self.conn._out_bytes <= OUTPUT_LIMIT + OUTPUT_HIGH_WATER + MESSAGE_MAX

    @invariant()
    def the_bystander_is_unharmed(self) -> None:
        self.rounds += 1
        self.bystander.write(STATE, str(self.rounds))
        assert (f"/local/domain/2/{STATE}", "fe2") in self.dom0.drain()
        assert self.store.counters(0)["watch_events_dropped"] == 0


HostileGuest.TestCase.settings = settings(
    max_examples=2000 if FUZZ else 40,
    stateful_step_count=60 if FUZZ else 20,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=list(HealthCheck),
)
test_fuzz_hostile_guest_against_xenstored = HostileGuest.TestCase
