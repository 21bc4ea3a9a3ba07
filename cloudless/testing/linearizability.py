"""A linearizability checker for key-value histories.

The search is Wing & Gong's: repeatedly pick an operation that is minimal in
the real-time order (called before every pending operation returned), apply it
to a sequential model, and backtrack when the model disagrees with the output
the client saw. Lowe's improvements make it practical ("Testing for
linearizability", Concurrency and Computation 2017):

* just-in-time linearization over a linked list of call/return events, so
  only operations whose call precedes the earliest pending return are tried;
* memoization of (set of linearized operations, model state): a configuration
  already proven a dead end is never explored again;
* P-compositionality (Herlihy & Wing's locality, Theorem 1): a history is
  linearizable iff each per-key sub-history is, so keys are checked apart.

Operations whose outcome the client never learned (`ret is None`) may take
effect at any time after their call, or never. They get a return event at
infinity and an unknown output, and the search succeeds once every operation
with a known outcome is linearized, so an indeterminate operation is only
placed when something observed needs it.

Models may be nondeterministic (`step` yields every possible next state),
which is what lets `VersionedRegisterModel` represent "a put whose new index
we never saw" until a later read reveals it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cloudless.errors import InvalidInput

log = logging.getLogger(__name__)


class InvalidHistory(InvalidInput):
    """The history itself is malformed (unknown op, return before call...)."""


class _Unknown:
    """The output of an operation whose outcome the client never learned."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation: invoked at `call`, answered at `ret`.

    `ret` None means the client never learned the outcome (timeout, crash):
    the operation may or may not have taken effect, at any time after `call`;
    its `output` is ignored.
    """

    client_id: int
    key: str
    op: str
    input: Any
    output: Any
    call: float
    ret: float | None

    def describe(self) -> str:
        when = f"[{self.call:g}, {'?' if self.ret is None else f'{self.ret:g}'}]"
        out = "?" if self.ret is None else repr(self.output)
        arg = "" if self.input is None else repr(self.input)
        return f"client {self.client_id} {when} {self.op}({arg}) -> {out}"


@dataclass(frozen=True, slots=True)
class CheckResult:
    linearizable: bool
    ops_checked: int
    key: str | None = None
    explanation: str = ""
    timed_out: bool = False  # the search gave up: neither proven nor refuted


class Model(Protocol):
    """A sequential specification. States must be hashable (they are memoized)."""

    def init(self) -> Hashable: ...

    def step(self, state: Hashable, op: str, input: Any, output: Any) -> Iterable[Hashable]:
        """Every state the object can be in after `op`; empty if `output` is
        impossible from `state`. `output` is UNKNOWN for indeterminate ops."""

    def is_read_only(self, op: str, output: Any) -> bool:
        """True if an `op` that answered `output` changes no state wherever it
        is legal (a get; a failed cas). With output UNKNOWN such ops are dropped."""

    # Optional: `never_legal(state, op, input, output) -> bool`, True only if
    # `output` is impossible from `state` and from every state reachable
    # from it. It prunes the search; a wrong True would wrongly fail histories.


def _freeze(value: Any) -> Any:
    """Hashable, comparable form: JSON round-trips turn tuples into lists."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


class RegisterModel:
    """A register per key: put(value) -> None, get() -> value or None (absent),
    cas((expected, new)) -> bool."""

    def init(self) -> Hashable:
        return None

    def is_read_only(self, op: str, output: Any) -> bool:
        return op == "get" or (op == "cas" and output is False)

    def step(self, state: Any, op: str, input: Any, output: Any) -> Iterable[Any]:
        if op == "put":
            return (_freeze(input),)
        if op == "get":
            if output is UNKNOWN or _freeze(output) == state:
                return (state,)
            return ()
        if op == "cas":
            expected, new = input
            matched = _freeze(expected) == state
            if output is not UNKNOWN and bool(output) != matched:
                return ()
            return (_freeze(new),) if matched else (state,)
        raise InvalidHistory(f"RegisterModel has no operation {op!r}", op=op)


class VersionedRegisterModel:
    """The cluster's vars store: every key carries a modify index.

    State is (value, index, floor): index 0 means absent, `floor` is the
    highest index this key has ever had (indices only grow), and index
    `_UNSEEN` means "present with an index above `floor` that no client has
    observed yet" (after an indeterminate write).

    - put(value) -> the new modify index (greater than any before)
    - get() -> (value, index), or None if absent
    - cas((expected_index, value)) -> (ok, index); expected_index 0 means
      "must not exist"; on success `index` is the new modify index, on failure
      the current one (0 if absent)
    - rm() -> True if the key existed
    """

    _UNSEEN = -1

    def init(self) -> Hashable:
        return (None, 0, 0)

    def is_read_only(self, op: str, output: Any) -> bool:
        # A failed cas or rm may still reveal an unseen index, but then its
        # successor differs from the state and it is not forced.
        if op == "get":
            return True
        if op == "cas" and output is not UNKNOWN:
            return not output[0]
        return op == "rm" and output is False

    def never_legal(self, state: Any, op: str, input: Any, output: Any) -> bool:
        # Indices only grow: once the key's index passed i, no later state
        # can make a write of i, or a read of an older i, legal.
        floor = state[2]
        try:
            if op == "put":
                return isinstance(output, int) and output <= floor
            if op == "cas" and output[0]:
                return isinstance(output[1], int) and output[1] <= floor
            if op in ("get", "cas") and output is not None:
                return isinstance(output[1], int) and 0 < output[1] < floor
        except (TypeError, IndexError):
            return False  # malformed: step() reports it
        return False

    def _index_could_be(self, state: tuple, index: int) -> bool:
        _, current, floor = state
        if current == self._UNSEEN:
            return index > floor
        return current == index

    def _observe(self, state: tuple, index: int) -> tuple:
        value, current, _ = state
        if current == self._UNSEEN:
            return (value, index, index)
        return state

    def step(self, state: Any, op: str, input: Any, output: Any) -> Iterable[Any]:
        value, index, floor = state
        unknown = output is UNKNOWN
        if op == "put":
            if unknown:
                return ((_freeze(input), self._UNSEEN, floor),)
            if not isinstance(output, int) or output <= floor:
                return ()
            return ((_freeze(input), output, output),)
        if op == "get":
            if unknown:
                return (state,)
            if output is None:
                return (state,) if index == 0 else ()
            got_value, got_index = output
            if index == 0 or _freeze(got_value) != value or not self._index_could_be(state, got_index):
                return ()
            return (self._observe(state, got_index),)
        if op == "cas":
            expected, new_value = input
            new_value = _freeze(new_value)
            if unknown:
                if expected == 0:
                    could_match, could_mismatch = index == 0, index != 0
                else:
                    could_match = index != 0 and self._index_could_be(state, expected)
                    could_mismatch = not could_match or index == self._UNSEEN
                outcomes = []
                if could_match:
                    outcomes.append((new_value, self._UNSEEN, max(floor, expected)))
                if could_mismatch:
                    outcomes.append(state)
                return tuple(outcomes)
            ok, got_index = output
            if ok:
                if expected == 0:
                    if index != 0:
                        return ()
                elif index == 0 or not self._index_could_be(state, expected):
                    return ()
                if not isinstance(got_index, int) or got_index <= max(floor, expected):
                    return ()
                return ((new_value, got_index, got_index),)
            # Failed: the precondition must not hold and got_index is the current index.
            if index == 0:
                return (state,) if expected != 0 and got_index == 0 else ()
            if expected == 0:
                return (self._observe(state, got_index),) if self._index_could_be(state, got_index) else ()
            if not self._index_could_be(state, got_index) or got_index == expected:
                return ()
            return (self._observe(state, got_index),)
        if op == "rm":
            if unknown:
                return ((None, 0, floor),)
            if bool(output) != (index != 0):
                return ()
            return ((None, 0, floor),)
        raise InvalidHistory(f"VersionedRegisterModel has no operation {op!r}", op=op)


class _Event:
    __slots__ = ("is_call", "match", "next", "op_id", "prev")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.match: _Event | None = None  # a call's return event
        self.prev: _Event | None = None
        self.next: _Event | None = None


class _SearchTimeout(Exception):
    pass


def _validate(ops: Sequence[Operation]) -> None:
    for op in ops:
        if op.ret is not None and op.ret < op.call:
            raise InvalidHistory(f"operation returns before it is called: {op.describe()}", key=op.key)
        if math.isnan(op.call):
            raise InvalidHistory(f"operation has no call time: {op.describe()}", key=op.key)


def _linearize(ops: Sequence[Operation], model: Model, deadline: float | None) -> bool:
    """Lowe's just-in-time linearization with memoization, for one key."""
    events: list[tuple[float, int, int, bool]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i, True))
        # Calls sort before returns at the same instant: touching operations
        # count as concurrent, which can only admit more linearizations.
        events.append((math.inf if op.ret is None else op.ret, 1, i, False))
    events.sort()
    head = _Event(-1, False)  # sentinel
    calls: dict[int, _Event] = {}
    last = head
    for _, _, op_id, is_call in events:
        ev = _Event(op_id, is_call)
        if is_call:
            calls[op_id] = ev
        else:
            calls[op_id].match = ev
        last.next = ev
        ev.prev = last
        last = ev

    # Every linked event has a predecessor (at least the sentinel) and every call its return.
    def lift(call: _Event) -> None:
        ret = call.match
        assert call.prev is not None and ret is not None
        call.prev.next = call.next
        if call.next is not None:
            call.next.prev = call.prev
        assert ret.prev is not None
        ret.prev.next = ret.next
        if ret.next is not None:
            ret.next.prev = ret.prev

    def unlift(call: _Event) -> None:
        ret = call.match
        assert call.prev is not None and ret is not None and ret.prev is not None
        ret.prev.next = ret
        if ret.next is not None:
            ret.next.prev = ret
        call.prev.next = call
        if call.next is not None:
            call.next.prev = call

    pending_known = sum(1 for op in ops if op.ret is not None)
    state = model.init()
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    # Each frame: (call event, state before it, linearized bits before, other
    # next states to try or None for a forced read-only op, the candidate list
    # it was chosen from and its position there).
    stack: list[tuple[_Event, Hashable, int, list[Hashable] | None, list[_Event], int]] = []

    def successors(call: _Event) -> tuple[Operation, Any, Iterable[Hashable]]:
        op = ops[call.op_id]
        output = UNKNOWN if op.ret is None else op.output
        try:
            return op, output, model.step(state, op.op, op.input, output)
        except (TypeError, ValueError) as exc:
            raise InvalidHistory(f"malformed operation {op.describe()}: {exc}", key=op.key) from exc

    def place(
        call: _Event, chosen: Hashable, alternatives: list[Hashable] | None, tried: list[_Event], at: int
    ) -> None:
        nonlocal state, linearized, pending_known
        bits = linearized | (1 << call.op_id)
        cache.add((bits, chosen))
        stack.append((call, state, linearized, alternatives, tried, at))
        lift(call)
        state, linearized = chosen, bits
        if ops[call.op_id].ret is not None:
            pending_known -= 1

    def window() -> list[_Event]:
        # Candidates: every op called before the earliest pending return, in
        # call order (measured: better here than return order, and better
        # than trying indeterminate ops last).
        out = []
        ev = head.next
        while ev is not None and ev.is_call:
            out.append(ev)
            ev = ev.next
        return out

    def forced_read(candidates: list[_Event]) -> _Event | None:
        # A read-only op the current state already explains can be linearized
        # right now without loss of generality: it is callable, so nothing
        # pending must precede it, and it changes no state, so moving it
        # earlier in any linearization keeps that linearization valid. Taking
        # it first (and never branching on it) prunes most of the search.
        # If that configuration was already explored (and so failed), this
        # one fails too: DEAD_END says so. So does a pending op that the model
        # says can never become legal again from this state.
        for ev in candidates:
            op, output, nexts = successors(ev)
            if never_legal is not None and op.ret is not None and never_legal(state, op.op, op.input, output):
                return DEAD_END
        for ev in candidates:
            op, output, nexts = successors(ev)
            if model.is_read_only(op.op, output) and tuple(nexts) == (state,):
                if (linearized | (1 << ev.op_id), state) in cache:
                    return DEAD_END
                return ev
        return None

    DEAD_END = _Event(-1, True)
    never_legal = getattr(model, "never_legal", None)

    # The candidate list of the current configuration and the position tried next.
    candidates: list[_Event] | None = None
    pos = 0
    steps = 0
    while True:
        if pending_known == 0:
            return True
        steps += 1
        if deadline is not None and steps & 1023 == 0 and time.monotonic() > deadline:
            raise _SearchTimeout
        if candidates is None:
            candidates, pos = window(), 0
            forced = forced_read(candidates)
            if forced is DEAD_END:
                pos = len(candidates)
            elif forced is not None:
                place(forced, state, None, candidates, -1)
                candidates = None
                continue
        if pos < len(candidates):
            entry = candidates[pos]
            _, _, nexts = successors(entry)
            bits = linearized | (1 << entry.op_id)
            options = [s for s in nexts if (bits, s) not in cache]
            if options:
                place(entry, options.pop(), options, candidates, pos)
                candidates = None
            else:
                pos += 1
            continue
        # No candidate can go next under the current prefix: undo choices
        # until one has an untried alternative.
        while True:
            if not stack:
                return False
            call, prev_state, prev_bits, alternatives, prev_candidates, prev_pos = stack.pop()
            unlift(call)
            if ops[call.op_id].ret is not None:
                pending_known += 1
            state, linearized = prev_state, prev_bits
            if alternatives is None:
                continue  # a forced op failed, so the configuration before it fails too
            bits = prev_bits | (1 << call.op_id)
            alternatives = [s for s in alternatives if (bits, s) not in cache]
            if alternatives:
                place(call, alternatives.pop(), alternatives, prev_candidates, prev_pos)
                candidates = None
            else:
                candidates, pos = prev_candidates, prev_pos + 1
            break


def _prefix_at(ops: Sequence[Operation], cut: float) -> list[Operation]:
    """The history as it stood at time `cut`: later calls vanish, ops still
    running become indeterminate."""
    out = []
    for op in ops:
        if op.call > cut:
            continue
        if op.ret is not None and op.ret > cut:
            op = Operation(op.client_id, op.key, op.op, op.input, None, op.call, None)
        out.append(op)
    return out


def _explain(key: str, ops: Sequence[Operation], model: Model, deadline: float | None) -> str:
    """Find the earliest moment the key's history stops being linearizable."""
    cuts = sorted({op.ret for op in ops if op.ret is not None})
    lo, hi = 0, len(cuts) - 1  # cuts[hi] is known to fail (it is the whole history)
    try:
        while lo < hi:
            mid = (lo + hi) // 2
            if _linearize(_prefix_at(ops, cuts[mid]), model, deadline):
                lo = mid + 1
            else:
                hi = mid
    except _SearchTimeout:
        pass
    cut = cuts[hi]
    prefix = sorted(_prefix_at(ops, cut), key=lambda o: (o.call, o.client_id))
    culprits = [op for op in ops if op.ret == cut]
    shown = prefix[-12:]
    lines = [
        (
            f"key {key!r}: not linearizable; the shortest failing prefix ends at t={cut:g} "
            f"({len(prefix)} ops), when this returned:"
        ),
        *(f"  ! {op.describe()}" for op in culprits),
        f"last {len(shown)} ops of that prefix, by call time (? = still running or unknown):",
        *(f"    {op.describe()}" for op in shown),
    ]
    return "\n".join(lines)


def check_history(
    ops: Sequence[Operation],
    model: Model | None = None,
    timeout_s: float | None = None,
) -> CheckResult:
    """Is `ops` linearizable with respect to `model` (default RegisterModel)?

    Keys are checked independently (P-compositionality). On failure `key` names
    the offending key and `explanation` shows the shortest failing prefix. If
    `timeout_s` passes first, the result has `timed_out=True` and
    `linearizable=False`.
    """
    model = model if model is not None else RegisterModel()
    _validate(ops)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        # An indeterminate read changes nothing and constrains nothing.
        if op.ret is None and model.is_read_only(op.op, UNKNOWN):
            continue
        by_key.setdefault(op.key, []).append(op)
    checked = 0
    for key in sorted(by_key):
        key_ops = by_key[key]
        try:
            ok = _linearize(key_ops, model, deadline)
        except _SearchTimeout:
            log.warning("linearizability.timeout", extra={"key": key, "ops": len(key_ops)})
            return CheckResult(
                False, checked, key, f"key {key!r}: gave up after {timeout_s}s ({len(key_ops)} ops)", True
            )
        checked += len(key_ops)
        if not ok:
            return CheckResult(False, checked, key, _explain(key, key_ops, model, deadline))
    return CheckResult(True, checked, None, f"{checked} ops on {len(by_key)} keys are linearizable")
