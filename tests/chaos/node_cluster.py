"""Real `cloudless node` processes in chaos-harness namespace hosts, and the
vars client the chaos workload drives them with.

Test modules cannot import each other under --import-mode=importlib; the
chaos-node tests load this file by path (`load()` at the bottom shows how).

Outcome rules of `NodeVars.operate` (the harness's contract, see
cloudless/testing/chaos.py):
- a reply, NotFound (get → None, rm → False) or Conflict (cas → (False,
  current_index) as committed by the state machine) is a known outcome;
- NotApplied only when no attempt of the op was ever sent: every connection
  attempt failed before a request could be written;
- anything else (Unavailable, ConnectionLost, DeadlineExceeded, a reset, an
  internal error) leaves the op indeterminate.
Writes carry a (client_id, seq) session and a failed attempt is retried on
other hosts with the same pair until the op's deadline: the node must apply
it at most once, and the history checker sees if it did not.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cloudless.api.client import ClusterClient
from cloudless.api.client_config import Context
from cloudless.api.client_config import load as load_client_config
from cloudless.api.messages import (
    Deleted,
    StatusReply,
    StatusRequest,
    TokenCreate,
    TokenReply,
    VarsCas,
    VarsGet,
    VarsPut,
    VarsRm,
    VarValue,
)
from cloudless.authz import ProofSigner
from cloudless.errors import CloudlessError, Conflict, InvalidInput, NotFound
from cloudless.pki.credentials import Credentials
from cloudless.pki.revocation import RevocationList
from cloudless.pki.verify import PeerVerifier
from cloudless.testing.linearizability import Operation
from cloudless.transport.rpc import RpcClient
from cloudless.transport.tls import TlsCarrier
from tests.harness.chaos import ChaosCluster, HostProcess, NotApplied, ProcessSpec, wait_tcp
from tests.harness.netns import Host
from tests.harness.waiting import wait_until

log = logging.getLogger(__name__)

PORT = 7400
STATUS_TIMEOUT_S = 2.0


async def _node_ready(proc: HostProcess) -> None:
    # Host 0's first start bootstraps: ready once it wrote the admin config.
    # Every node serves TCP (TLS) on its port once enrolled.
    if proc.host.index == 0:
        await wait_until(lambda: (proc.data_dir / "admin.yaml").exists(), interval=0.1)
    await wait_tcp(proc.host.ip, proc.spec.port, timeout_s=proc.spec.ready_timeout_s)


def node_spec(port: int = PORT, voter_stabilization_s: float = 1.0) -> ProcessSpec:
    """`cloudless node` in a host: named after the host (host<i>), joined via
    the `join_flags` template value ("" for host 0, which bootstraps)."""
    return ProcessSpec(
        argv=[
            sys.executable,
            "-m",
            "cloudless",
            "node",
            "--data-dir",
            "{data_dir}",
            "--listen",
            "{address}",
            "--name",
            "{name}",
            "--voter-stabilization",
            str(voter_stabilization_s),
            "{join_flags}",
        ],
        port=port,
        env={"PYTHONUNBUFFERED": "1"},
        ready=_node_ready,
        ready_timeout_s=60.0,
        stop_grace_s=5.0,
    )


def host_index(name: str) -> int:
    if not name.startswith("host") or not name[4:].isdigit():
        raise InvalidInput(f"{name!r} is not a chaos host name", name=name)
    return int(name[4:])


class NodeCluster:
    """A ChaosCluster running one node per host, plus the admin client."""

    def __init__(self, cluster: ChaosCluster) -> None:
        self.cluster = cluster
        self.context: Context | None = None
        self.rpc: RpcClient | None = None

    @property
    def size(self) -> int:
        return self.cluster.size

    def address(self, host: int) -> str:
        return self.cluster.process(host).address

    def client(self, host: int, timeout: float = STATUS_TIMEOUT_S) -> ClusterClient:
        assert self.context is not None
        return ClusterClient(self.context, endpoint=self.address(host), timeout=timeout)

    async def bootstrap(self, timeout_s: float = 90.0) -> StatusReply:
        """Host 0 creates the cluster, the others join with one token; returns
        once every node is a voter and alive."""
        await self.cluster.start(0, join_flags="")
        self.context = load_client_config(self.cluster.process(0).data_dir / "admin.yaml").context()
        credentials = Credentials(self.context.ca_pem, self.context.certificate_pem, self.context.key_pem)
        verifier = PeerVerifier(credentials.ca_certificate, RevocationList(), self.context.cluster_id)
        # Signed like the CLI's calls, so a follower can forward them to the leader (authz.proof).
        signer = ProofSigner(self.context.certificate_pem, self.context.key_pem)
        self.rpc = RpcClient(TlsCarrier(credentials, verifier), signer=signer)
        token = await self._token(uses=self.size - 1, timeout_s=30.0)
        join = f"--join\0{self.address(0)}\0--token\0{token}"
        async with trio.open_nursery() as nursery:
            for i in range(1, self.size):
                nursery.start_soon(lambda i=i: self.cluster.start(i, join_flags=join))
        return await self.wait_healthy(timeout_s)

    async def _token(self, uses: int, timeout_s: float) -> str:
        with trio.fail_after(timeout_s):
            while True:
                client = self.client(0, timeout=5.0)
                try:
                    reply = await client.call(
                        "token.create",
                        TokenCreate(ttl_s=900.0, uses=uses, role="node", trust="coordinator"),
                        response=TokenReply,
                    )
                    return reply.token
                except CloudlessError as exc:  # e.g. the CA not committed yet
                    log.info("chaos_node.token_retry", extra={"fields": {"error": str(exc)}})
                    await trio.sleep(0.2)
                finally:
                    await client.aclose()

    async def status(self, host: int, timeout: float = STATUS_TIMEOUT_S) -> StatusReply:
        client = self.client(host, timeout=timeout)
        try:
            return await client.call("status", StatusRequest(), response=StatusReply)
        finally:
            await client.aclose()

    async def any_status(self, hosts: Sequence[int] | None = None) -> StatusReply | None:
        """The first status any of `hosts` answers (status runs on the leader)."""
        for host in hosts if hosts is not None else range(self.size):
            if not self.cluster.process(host).running:
                continue
            try:
                with trio.fail_after(STATUS_TIMEOUT_S + 0.5):
                    return await self.status(host)
            except (CloudlessError, OSError, trio.TooSlowError):
                continue
        return None

    async def leader(self, cluster: ChaosCluster | None = None) -> int:
        """Index of the current Raft leader (a fault `Target`); host 0 if none is known."""
        status = await self.any_status()
        if status is None or not status.leader:
            log.info("chaos_node.no_leader_known", extra={"fields": {}})
            return 0
        return host_index(status.leader)

    @property
    def expected_voters(self) -> int:
        # Autopilot's default targets (coordinator/autopilot.py): 1, 3 from 3, 5 from 7.
        return 5 if self.size >= 7 else 3 if self.size >= 3 else 1

    async def wait_healthy(self, timeout_s: float, full_voters: bool = True) -> StatusReply:
        """Until one status shows a leader and every member alive, and (with
        `full_voters`) autopilot's full number of voters. Without it any voter
        set will do: autopilot shrinks it while members count as flapping
        (more than 3 suspect/dead transitions in 10 minutes), which a long
        fault schedule causes on purpose."""
        last: StatusReply | None = None
        with trio.move_on_after(timeout_s):
            while True:
                last = await self.any_status()
                if (
                    last is not None
                    and last.leader
                    and (len(last.voters) == self.expected_voters or (not full_voters and last.voters))
                    and len(last.members) == self.size
                    and all(m.state == "alive" for m in last.members)
                ):
                    return last
                await trio.sleep(0.25)
        raise AssertionError(f"cluster not healthy within {timeout_s}s; last status {last!r}")

    async def read_back(
        self,
        keys: Sequence[str],
        t0: float,
        first_client: int,
        hosts: Sequence[int] | None = None,
        timeout_s: float = 30.0,
        unanswered: dict[int, str] | None = None,
    ) -> list[Operation]:
        """A linearizable get of every key through every host (or `hosts`),
        retried until it answers; as history operations (times relative to
        `t0`, one client each). A host that never answers fails the call, or,
        given an `unanswered` dict, is recorded there (host -> last error)."""
        assert self.rpc is not None
        out: list[Operation] = []
        for host in hosts if hosts is not None else range(self.size):
            address = (self.cluster.hosts[host].ip, self.cluster.process(host).spec.port)
            for key in keys:
                last: BaseException | None = None
                answered = False
                with trio.move_on_after(timeout_s):
                    while not answered:
                        call = trio.current_time()
                        try:
                            reply = await self.rpc.call(
                                address, "vars.get", VarsGet(key), response=VarValue, timeout=2.0
                            )
                            output: Any = (reply.value, reply.index)
                        except NotFound:
                            output = None
                        except (CloudlessError, OSError) as exc:
                            last = exc
                            await trio.sleep(0.2)
                            continue
                        ret = trio.current_time()
                        out.append(Operation(first_client + len(out), key, "get", None, output, call - t0, ret - t0))
                        answered = True
                if not answered:
                    if unanswered is None:
                        raise AssertionError(
                            f"host{host} did not answer a get of {key} within {timeout_s}s after healing: {last!r}"
                        )
                    unanswered[host] = repr(last)
                    break
        return out

    async def aclose(self) -> None:
        if self.rpc is not None:
            await self.rpc.aclose()


@dataclass
class _Session:
    client_id: str = field(default_factory=lambda: f"chaos-{secrets.token_hex(6)}")
    seq: int = 0


# One session per workload client: trio runs each client in its own task,
# and each task has its own copy of the context.
_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("chaos_node_session", default=None)


class NodeVars:
    """The workload's `operate` over the node's vars API (module doc: outcome rules)."""

    def __init__(self, nodes: NodeCluster, attempt_timeout_s: float = 1.0, op_deadline_s: float = 2.5) -> None:
        self.nodes = nodes
        self.attempt_timeout_s = attempt_timeout_s
        self.op_deadline_s = op_deadline_s  # keep below the workload's op_timeout_s
        self.attempts = 0
        self.retries = 0
        self.connect_failures = 0

    def _request(self, op: str, key: str, arg: Any, session: _Session) -> tuple[str, Any, Any]:
        if op == "get":
            return "vars.get", VarsGet(key), VarValue
        if op == "put":
            return "vars.put", VarsPut(key, arg, session.client_id, session.seq), VarValue
        if op == "cas":
            expected, value = arg
            return "vars.cas", VarsCas(key, value, expected, session.client_id, session.seq), VarValue
        if op == "rm":
            return "vars.rm", VarsRm(key, None, session.client_id, session.seq), Deleted
        raise InvalidInput(f"unknown vars op {op!r}", op=op)

    @staticmethod
    def _outcome(op: str, reply: Any) -> Any:
        if op == "get":
            return (reply.value, reply.index)
        if op == "put":
            return reply.index
        if op == "cas":
            return (True, reply.index)
        return True

    @staticmethod
    def _refusal(op: str, exc: CloudlessError) -> Any:
        """The known outcome a NotFound / Conflict answer stands for."""
        if isinstance(exc, NotFound) and op in ("get", "rm"):
            return None if op == "get" else False
        if isinstance(exc, Conflict) and op == "cas" and "current_index" in exc.context:
            return (False, int(exc.context["current_index"]))
        raise AssertionError(f"{op} answered {type(exc).__name__} {exc.to_dict()}: not an outcome of this op")

    async def operate(self, host: Host, op: str, key: str, arg: Any) -> Any:
        assert self.nodes.rpc is not None
        session = _session.get()
        if session is None:
            session = _Session()
            _session.set(session)
        if op != "get":
            session.seq += 1
        method, request, response = self._request(op, key, arg, session)
        order = [host.index] + [i for i in range(self.nodes.size) if i != host.index]
        sent = False
        last: BaseException | None = None  # the last failure (any attempt)
        last_sent: BaseException | None = None  # the last failure of a sent request
        deadline = trio.current_time() + self.op_deadline_s
        attempt = 0
        while trio.current_time() < deadline:
            target = order[attempt % len(order)]
            attempt += 1
            self.attempts += 1
            if attempt > 1:
                self.retries += 1
            address = (self.nodes.cluster.hosts[target].ip, self.nodes.cluster.process(target).spec.port)
            left = deadline - trio.current_time()
            try:
                with trio.fail_after(min(self.attempt_timeout_s, left)):
                    conn = await self.nodes.rpc.pool.get(address)
            except (OSError, CloudlessError, trio.TooSlowError) as exc:
                # Nothing was written to this host: the request never left.
                self.connect_failures += 1
                last = exc
                await trio.sleep(min(0.05, max(0.0, deadline - trio.current_time())))
                continue
            sent = True
            left = deadline - trio.current_time()
            try:
                reply = await self.nodes.rpc.call(
                    conn, method, request, response=response, timeout=max(0.05, min(self.attempt_timeout_s, left))
                )
            except (NotFound, Conflict) as exc:
                return self._refusal(op, exc)
            except InvalidInput as exc:
                # The node refused our (valid) request: a bug, not an outcome.
                raise AssertionError(f"{method} to host{target} refused as invalid: {exc.to_dict()}") from exc
            except (CloudlessError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if conn.is_closed:
                    self.nodes.rpc.pool.discard(address, conn)
                last = last_sent = exc
                continue
            return self._outcome(op, reply)
        if not sent:
            raise NotApplied(f"{op} {key}: no host could be reached ({last!r})")
        # Indeterminate: a later request under this session must not be
        # mistaken for a retry of this one, so the client starts a new session.
        _session.set(_Session())
        if isinstance(last_sent, CloudlessError):
            raise last_sent
        raise CloudlessError(f"{op} {key}: no answer before the deadline ({last_sent!r})")


def acknowledged_writes(history: Sequence[Operation]) -> dict[str, list[tuple[int, str]]]:
    """key -> [(modify index, value)] of every write a client saw succeed."""
    out: dict[str, list[tuple[int, str]]] = {}
    for op in history:
        if op.ret is None:
            continue
        if op.op == "put":
            out.setdefault(op.key, []).append((int(op.output), op.input))
        elif op.op == "cas" and op.output[0]:
            out.setdefault(op.key, []).append((int(op.output[1]), op.input[1]))
    return out


def load(path: Path | None = None):
    """This module, loaded by path (tests cannot import each other)."""
    import importlib.util

    path = path or Path(__file__)
    name = "chaos_node_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
