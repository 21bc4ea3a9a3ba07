"""The leader's next step in a CA rotation (`cloudless ca rotate`), decided from the state alone.

Phase 1 (trust): the next CA is in every trust bundle; from half the overlap
on, activate it. Phase 2 (re-issue): it signs; nodes renew at once, clients
the next time their CLI runs. Phase 3: after the whole overlap, once every
registered node holds a certificate from it, retire the previous CA. The
state machine checks the same conditions again at apply.
"""

from __future__ import annotations

from cloudless.state.commands import ActivateNextCA, RetireCA
from cloudless.state.fsm import StateMachine


def ca_rotation_step(fsm: StateMachine, now: float) -> ActivateNextCA | RetireCA | None:
    rotation = fsm.ca_rotation
    if rotation is None:
        return None
    if rotation.phase == "trust":
        return ActivateNextCA(rotation.other_key_id) if now >= rotation.activate_at else None
    return RetireCA(rotation.other_key_id) if not fsm.ca_retire_blockers(now) else None
