"""The default seccomp profile: what it refuses and how."""

import errno

from cloudless.sandbox.seccomp import CLONE_NAMESPACE_FLAGS, DENIED_SYSCALLS, default_profile


def _rules_for(profile, name):
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_escape_relevant_syscalls_are_refused_with_eperm():
    p = default_profile()
    for name in ("mount", "umount2", "pivot_root", "unshare", "setns", "bpf", "kexec_load", "init_module",
                 "open_by_handle_at", "keyctl", "perf_event_open", "userfaultfd"):  # fmt: skip
        rules = _rules_for(p, name)
        assert rules, name
        assert all(r["action"] == "SCMP_ACT_ERRNO" and r["errnoRet"] == errno.EPERM for r in rules), name


def test_everything_else_is_allowed_by_default():
    p = default_profile()
    assert p["defaultAction"] == "SCMP_ACT_ALLOW"
    for common in ("read", "write", "openat", "clone", "execve", "socket", "epoll_wait", "futex"):
        assert all("args" in r for r in _rules_for(p, common)), common  # only conditional rules, if any


def test_clone3_answers_enosys_so_libc_falls_back_to_clone():
    (rule,) = _rules_for(default_profile(), "clone3")
    assert rule["errnoRet"] == errno.ENOSYS


def test_clone_with_any_namespace_flag_is_refused():
    rules = _rules_for(default_profile(), "clone")
    flags = {r["args"][0]["value"] for r in rules}
    assert flags == set(CLONE_NAMESPACE_FLAGS.values())
    for r in rules:
        (arg,) = r["args"]
        assert arg["index"] == 0 and arg["op"] == "SCMP_CMP_MASKED_EQ" and arg["value"] == arg["valueTwo"]


def test_denylist_has_no_duplicates():
    assert len(DENIED_SYSCALLS) == len(set(DENIED_SYSCALLS))
