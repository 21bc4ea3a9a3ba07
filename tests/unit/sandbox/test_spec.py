"""config.json generation: each field against what the OCI runtime spec 1.0.2 and Docker's defaults say."""

import json

import msgspec
import pytest

from cloudless.sandbox.runtime import (
    BindMount,
    ContainerSpec,
    HealthCheck,
    InvalidContainerSpec,
    PortMapping,
    TmpfsMount,
    validate_spec,
)
from cloudless.sandbox.spec import (
    CAPABILITIES,
    MASKED_PATHS,
    READONLY_PATHS,
    HostCgroups,
    ResolvedUser,
    build_config,
    resolve_user,
)

V1 = HostCgroups(version=1, swap_accounting=True)
V2 = HostCgroups(version=2, swap_accounting=True)
ROOT = ResolvedUser(0, 0)


def make(**kw):
    base = dict(id="web-1", rootfs="/var/lib/x/rootfs", args=["/bin/httpd", "-f"], network="none")
    base.update(kw)
    return ContainerSpec(**base)


def config(spec=None, **kw):
    kw.setdefault("user", ROOT)
    kw.setdefault("cgroups", V1)
    kw.setdefault("cgroups_path", "cloudless-x/web-1")
    return build_config(spec or make(), **kw)


def test_process_fields():
    c = config(make(env={"A": "1"}, cwd="/srv", hostname="h"))
    p = c["process"]
    assert c["ociVersion"] == "1.0.2"
    assert p["terminal"] is False
    assert p["args"] == ["/bin/httpd", "-f"]
    assert p["cwd"] == "/srv"
    assert "A=1" in p["env"]
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in p["env"])  # default PATH added
    assert "HOSTNAME=h" in p["env"]
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["noNewPrivileges"] is True
    assert c["hostname"] == "h"
    assert json.loads(json.dumps(c)) == c  # serialisable as is


def test_image_path_is_not_overridden():
    c = config(make(env={"PATH": "/opt/bin"}))
    assert [e for e in c["process"]["env"] if e.startswith("PATH=")] == ["PATH=/opt/bin"]


def test_capabilities_are_reduced_and_never_inheritable_or_ambient():
    caps = config()["process"]["capabilities"]
    assert set(caps["bounding"]) == set(CAPABILITIES)
    assert caps["effective"] == caps["permitted"] == caps["bounding"]
    assert caps["inheritable"] == [] and caps["ambient"] == []
    for dangerous in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_MODULE", "CAP_MKNOD", "CAP_NET_RAW"):
        assert dangerous not in caps["bounding"]


def test_non_root_user_gets_no_effective_capabilities():
    caps = config(user=ResolvedUser(1000, 1000))["process"]["capabilities"]
    assert caps["effective"] == [] and caps["permitted"] == []
    assert caps["bounding"]  # still bounds file capabilities


def test_namespaces_per_network_mode():
    def ns(mode, path=None, cg=V1):
        c = config(make(network=mode), netns_path=path, cgroups=cg)
        return c["linux"]["namespaces"]

    assert {n["type"] for n in ns("none")} == {"pid", "ipc", "uts", "mount", "network"}
    assert {"type": "network"} in ns("none")  # fresh, unnamed
    assert {"type": "network", "path": "/run/netns/x"} in ns("bridge", "/run/netns/x")
    assert "network" not in {n["type"] for n in ns("host")}
    assert "cgroup" in {n["type"] for n in ns("none", cg=V2)}
    assert "cgroup" not in {n["type"] for n in ns("none", cg=V1)}
    with pytest.raises(ValueError):
        ns("bridge", None)


def test_cgroup_limits_cpu_memory_pids():
    c = config(make(cpu=1.5, memory_bytes=64 << 20, pids_limit=100))
    r = c["linux"]["resources"]
    assert r["cpu"] == {"quota": 150000, "period": 100000}
    assert r["memory"] == {"limit": 64 << 20, "swap": 64 << 20}  # no swap headroom: OOM is real
    assert r["pids"] == {"limit": 100}
    assert r["devices"] == [{"allow": False, "access": "rwm"}]
    assert c["linux"]["cgroupsPath"] == "cloudless-x/web-1"


def test_swap_is_omitted_without_swap_accounting():
    c = config(make(memory_bytes=64 << 20), cgroups=HostCgroups(version=1, swap_accounting=False))
    assert c["linux"]["resources"]["memory"] == {"limit": 64 << 20}


def test_unlimited_spec_sets_no_limits():
    r = config()["linux"]["resources"]
    assert set(r) == {"devices"}


def test_masked_and_readonly_paths_match_docker():
    linux = config()["linux"]
    assert linux["maskedPaths"] == list(MASKED_PATHS)
    assert "/proc/kcore" in linux["maskedPaths"] and "/sys/firmware" in linux["maskedPaths"]
    assert linux["readonlyPaths"] == list(READONLY_PATHS)
    assert "/proc/sys" in linux["readonlyPaths"] and "/proc/sysrq-trigger" in linux["readonlyPaths"]


def test_seccomp_profile_is_attached():
    sc = config()["linux"]["seccomp"]
    assert sc["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "SCMP_ARCH_X86_64" in sc["architectures"]


def _mounts(c):
    return {m["destination"]: m for m in c["mounts"]}


def test_standard_mounts():
    m = _mounts(config())
    assert m["/proc"]["type"] == "proc"
    assert m["/dev"]["type"] == "tmpfs"
    assert m["/dev/pts"]["type"] == "devpts" and "newinstance" in m["/dev/pts"]["options"]
    assert m["/dev/shm"]["type"] == "tmpfs" and "noexec" in m["/dev/shm"]["options"]
    assert m["/sys"]["type"] == "sysfs" and "ro" in m["/sys"]["options"]
    assert m["/sys/fs/cgroup"]["type"] == "cgroup" and "ro" in m["/sys/fs/cgroup"]["options"]


def test_host_network_binds_sys_read_only():
    m = _mounts(config(make(network="host")))
    assert m["/sys"]["type"] == "bind" and "ro" in m["/sys"]["options"]


def test_readonly_root_gets_writable_tmp_and_run():
    c = config(make(readonly_rootfs=True))
    assert c["root"] == {"path": "/var/lib/x/rootfs", "readonly": True}
    m = _mounts(c)
    for d in ("/tmp", "/run"):
        assert m[d]["type"] == "tmpfs" and "mode=1777" in m[d]["options"]
    assert "/tmp" not in _mounts(config(make(readonly_rootfs=False)))


def test_user_tmpfs_replaces_default_and_bind_mounts_are_private():
    spec = make(
        readonly_rootfs=True,
        tmpfs=[TmpfsMount("/tmp", size_bytes=1 << 20, mode=0o700)],
        mounts=[BindMount("/srv/secret", "/run/secrets/db"), BindMount("/srv/vol", "/data", readonly=False)],
    )
    mounts = config(spec)["mounts"]
    tmps = [m for m in mounts if m["destination"] == "/tmp"]
    assert len(tmps) == 1 and "size=1048576" in tmps[0]["options"] and "mode=700" in tmps[0]["options"]
    m = _mounts(config(spec))
    assert m["/run/secrets/db"]["type"] == "bind" and "ro" in m["/run/secrets/db"]["options"]
    assert "rw" in m["/data"]["options"] and "rprivate" in m["/data"]["options"]


def test_etc_files_are_bound_read_only():
    m = _mounts(config(etc_files={"/etc/hosts": "/state/etc/hosts"}))
    assert m["/etc/hosts"]["source"] == "/state/etc/hosts" and "ro" in m["/etc/hosts"]["options"]


def test_labels_become_annotations():
    c = config(make(labels={"app": "web"}))
    assert c["annotations"] == {"cloudless.label.app": "web"}


def test_nofile_rlimit_is_set():
    c = config(nofile_limit=4096)
    assert c["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}]


# ---------------------------------------------------------------- user resolution

PASSWD = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\n"
GROUP = "root:x:0:\nwww:x:34:\nlogs:x:50:www,other\n"


@pytest.mark.parametrize(
    "user,expect",
    [
        ("0:0", ResolvedUser(0, 0)),
        ("1000", ResolvedUser(1000, 0)),  # unknown uid: gid 0 like Docker
        ("33", ResolvedUser(33, 34, (50,))),
        ("www", ResolvedUser(33, 34, (50,))),
        ("www:root", ResolvedUser(33, 0, (50,))),
        ("www:7", ResolvedUser(33, 7, (50,))),
    ],
)
def test_resolve_user(user, expect):
    assert resolve_user(user, PASSWD, GROUP) == expect


@pytest.mark.parametrize("user", ["nobody", "www:nogroup"])
def test_resolve_unknown_names_is_an_invalid_spec(user):
    with pytest.raises(InvalidContainerSpec):
        resolve_user(user, PASSWD, GROUP)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(id="../x"), "id"),
        (dict(id=""), "id"),
        (dict(rootfs="relative"), "rootfs"),
        (dict(args=[]), "args"),
        (dict(env={"A=B": "1"}), "env"),
        (dict(cwd="srv"), "cwd"),
        (dict(user="root;rm"), "user"),
        (dict(memory_bytes=1024), "memory_bytes"),
        (dict(cpu=0), "cpu"),
        (dict(pids_limit=0), "pids_limit"),
        (dict(mounts=[BindMount("/a", "/x/../etc")]), "mounts"),
        (dict(mounts=[BindMount("rel", "/x")]), "mounts"),
        (dict(tmpfs=[TmpfsMount("/t")], mounts=[BindMount("/a", "/t")]), "mounts"),
        (dict(network="bridge", ports=[PortMapping(0, 80)]), "ports"),
        (dict(network="bridge", ports=[PortMapping(8080, 80), PortMapping(8080, 81)]), "ports"),
        (dict(network="host", ports=[PortMapping(8080, 80)]), "ports"),
        (dict(health=HealthCheck(kind="exec")), "health"),
        (dict(health=HealthCheck(kind="http", port=0)), "health"),
        (dict(stop_signal=0), "stop_signal"),
        (dict(hostname="bad_host!"), "hostname"),
        (dict(network="none", health=HealthCheck(kind="tcp", port=80)), "health"),
    ],
)
def test_validate_spec_names_the_bad_field(kw, field):
    with pytest.raises(InvalidContainerSpec) as e:
        validate_spec(make(**kw))
    assert e.value.context["field"] == field
    assert e.value.exit_code == 2


def test_spec_round_trips_through_msgspec_and_rejects_bad_types():
    spec = make(ports=[], memory_bytes=1 << 26)
    assert msgspec.json.decode(msgspec.json.encode(spec), type=ContainerSpec) == spec
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id":"x","rootfs":"/r","args":["a"],"network":"wifi"}', type=ContainerSpec)
