"""Random sequences of ledger operations, checked after every step against the in-memory model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dispatcher.credits.audit import run_audit
from dispatcher.credits.ledger import CreditStore
from dispatcher.credits.subscriptions import create_account
from dispatcher.errors import DispatcherError
from tests.integration.ledger_model import LedgerModel, ModelRefused

T = TypeVar("T")
JOBS = [f"job{i}" for i in range(12)]
amounts = st.integers(min_value=1, max_value=25)


class LedgerMachine(RuleBasedStateMachine):
    dsn: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(self.dsn))
        self.store = CreditStore(self.conn)
        self.model = LedgerModel()
        self.account = f"m-{uuid.uuid4().hex[:12]}"
        self.run(create_account(self.conn, self.account))
        self.grant_refs: list[str] = []
        self.counter = 0

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.conn.close())
        self.loop.close()

    def job(self, name: str) -> str:
        return f"{self.account}-{name}"

    def both(self, real: Callable[[], Awaitable[Any]], model: Callable[[], Any]) -> None:
        """Apply one operation to the database and the model; they must agree on the outcome."""
        try:
            expected = model()
        except ModelRefused as refused:
            with pytest.raises(DispatcherError) as info:
                self.run(real())
            assert type(info.value).__name__ == refused.error
            return
        actual = self.run(real())
        if isinstance(expected, bool):
            new = getattr(actual, "new", None)
            replayed = getattr(actual, "replayed", None)
            got = new if new is not None else (not replayed if replayed is not None else actual)
            assert got == expected
        elif isinstance(expected, list):
            assert actual.reserved == [self.job(j) for j in expected]

    @initialize(subscription=st.integers(0, 40))
    def start(self, subscription: int) -> None:
        self.new_period(subscription)

    @rule(amount=amounts)
    def grant(self, amount: int) -> None:
        self.counter += 1
        ref = f"{self.account}-g{self.counter}"
        self.grant_refs.append(ref)
        self.both(lambda: self.store.grant(self.account, amount, "purchase", ref),
                  lambda: self.model.grant(ref, amount))

    @rule(data=st.data())
    def replay_grant(self, data: st.DataObject) -> None:
        if not self.grant_refs:
            return
        ref = data.draw(st.sampled_from(self.grant_refs))
        amount = data.draw(st.sampled_from([self.model.grants[ref], self.model.grants[ref] + 1]))
        self.both(lambda: self.store.grant(self.account, amount, "purchase", ref),
                  lambda: self.model.grant(ref, amount))

    @rule(job=st.sampled_from(JOBS), amount=amounts)
    def reserve(self, job: str, amount: int) -> None:
        self.both(lambda: self.store.reserve(self.job(job), self.account, amount),
                  lambda: self.model.reserve(self.job(job), amount))

    @rule(jobs=st.lists(st.tuples(st.sampled_from(JOBS), amounts), min_size=1, max_size=6))
    def reserve_many(self, jobs: list[tuple[str, int]]) -> None:
        self.both(
            lambda: self.store.reserve_many(self.account, [(self.job(j), a) for j, a in jobs]),
            lambda: [j.removeprefix(f"{self.account}-")
                     for j in self.model.reserve_many([(self.job(j), a) for j, a in jobs])])

    @rule(job=st.sampled_from(JOBS), delta=st.integers(-25, 25))
    def capture(self, job: str, delta: int) -> None:
        r = self.model.reservations.get(self.job(job))
        actual = max(0, (r.captured if r and r.captured is not None else (r.amount if r else 1))
                     + delta)
        self.both(lambda: self.store.capture(self.job(job), actual),
                  lambda: self.model.settle(self.job(job), actual))

    @rule(job=st.sampled_from(JOBS))
    def release(self, job: str) -> None:
        self.both(lambda: self.store.release(self.job(job)),
                  lambda: self.model.settle(self.job(job), None))

    @rule(amount=st.integers(0, 40))
    def new_period(self, amount: int) -> None:
        self.counter += 1
        ref = f"{self.account}:period{self.counter}"
        now = datetime.now(UTC)
        self.both(lambda: self.store.start_period(self.account, amount, ref, now,
                                                  now + timedelta(days=30)),
                  lambda: self.model.renew(ref, amount))

    @rule(data=st.data(), amount=st.integers(1, 30))
    def refund(self, data: st.DataObject, amount: int) -> None:
        if not self.grant_refs:
            return
        bucket = data.draw(st.sampled_from(self.grant_refs))
        self.counter += 1
        ref = f"{self.account}-r{self.counter}"
        self.both(lambda: self.store.refund(self.account, bucket, amount, ref),
                  lambda: self.model.refund(bucket, amount, ref))

    @invariant()
    def database_matches_model(self) -> None:
        balance = self.run(self.store.balance(self.account))
        m = self.model
        assert (balance.subscription, balance.purchased, balance.debt, balance.reserved) == (
            m.sub, sum(m.buckets.values()), m.debt, m.reserved)
        rows = self.run(self.conn.fetch(
            "SELECT reference, remaining FROM credit_buckets WHERE account_id = $1 ORDER BY id",
            self.account))
        assert [(r["reference"], r["remaining"]) for r in rows] == list(m.buckets.items())
        violations = [v for v in self.run(run_audit(self.conn)) if v.account_id == self.account]
        assert violations == []


def test_ledger_follows_the_model(database_url: str) -> None:
    LedgerMachine.dsn = database_url
    machine = LedgerMachine.TestCase
    machine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
    machine().runTest()
