"""The shipped seccomp profiles decide every socket family and clone flag as intended: each
value meets exactly the rules it should (libseccomp refuses overlapping rules whose actions
differ, and a gap would fall to the default)."""

import json
from pathlib import Path
from typing import Any

import pytest

from controller.runtime.gvisor import SECCOMP_PROFILE as GVISOR
from controller.runtime.podman import SECCOMP_PROFILE as RUNC

ALLOW = "SCMP_ACT_ALLOW"
NAMESPACE_FLAGS = [0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000]
THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes to clone
SIGCHLD = 17
FAMILIES = [*range(64), 1 << 32 | 40, 1 << 32 | 2, (1 << 64) - 1]


def load(path: Path) -> dict[str, Any]:
    profile: dict[str, Any] = json.loads(path.read_text())
    return profile


def matches(rule: dict[str, Any], args: tuple[int, ...]) -> bool:
    for condition in rule["args"] or []:
        value, want, two = args[condition["index"]], condition["value"], condition["valueTwo"]
        held = {
            "SCMP_CMP_EQ": value == want,
            "SCMP_CMP_NE": value != want,
            "SCMP_CMP_LT": value < want,
            "SCMP_CMP_GT": value > want,
            "SCMP_CMP_MASKED_EQ": value & want == two,
        }[condition["op"]]
        if not held:
            return False
    return True


def rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    # s390's rules read clone's flags from the second argument; the hosts are x86-64 or arm64.
    return [
        rule
        for rule in profile["syscalls"]
        if name in rule["names"] and "s390" not in rule["includes"].get("arches", [])
    ]


def decide(profile: dict[str, Any], name: str, args: tuple[int, ...]) -> set[str]:
    """The actions (with errno) of every rule that matches: one, or none for the default."""
    return {
        rule["action"] + ("" if rule["action"] == ALLOW else f":{rule['errnoRet']}")
        for rule in rules_for(profile, name)
        if matches(rule, args)
    }


@pytest.mark.parametrize("path", [RUNC, GVISOR], ids=["runc", "gvisor"])
def test_every_socket_family_is_decided_once(path: Path) -> None:
    profile = load(path)
    for family in FAMILIES:
        for protocol in (0, 9, 16):
            allowed = family in (1, 2, 10) or (family == 16 and protocol == 0)
            matching = [
                r for r in rules_for(profile, "socket") if matches(r, (family, 1, protocol))
            ]
            assert len(matching) <= 1, (family, protocol)  # no overlaps
            decided = decide(profile, "socket", (family, 1, protocol))
            if allowed:
                assert decided <= {ALLOW}, (family, protocol)
            else:
                expected = "SCMP_ACT_ERRNO:93" if family == 16 else "SCMP_ACT_ERRNO:97"
                assert decided == {expected}, (family, protocol)


@pytest.mark.parametrize("path", [RUNC, GVISOR], ids=["runc", "gvisor"])
def test_no_clone_or_unshare_makes_a_namespace(path: Path) -> None:
    profile = load(path)
    for name, flags in (("clone", SIGCHLD), ("clone", THREAD_FLAGS), ("unshare", 0x400)):
        assert decide(profile, name, (flags, 0)) <= {ALLOW}, (name, hex(flags))
    for name in ("clone", "unshare"):
        for flag in NAMESPACE_FLAGS:
            for others in (SIGCHLD, THREAD_FLAGS, NAMESPACE_FLAGS[0]):
                assert decide(profile, name, (flag | others, 0)) == {"SCMP_ACT_ERRNO:1"}
    assert decide(profile, "unshare", (0x80, 0)) == {"SCMP_ACT_ERRNO:1"}  # CLONE_NEWTIME
    assert decide(profile, "setns", (3, 0)) == {"SCMP_ACT_ERRNO:1"}


def test_runc_refuses_what_it_does_not_list_and_clone3_as_unknown() -> None:
    profile = load(RUNC)
    assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 38)
    assert decide(profile, "clone3", (0, 0)) == {"SCMP_ACT_ERRNO:38"}  # glibc falls back
    assert decide(profile, "socketcall", (1, 0)) == set()  # the default: ENOSYS
    assert all(not arch["subArchitectures"] for arch in profile["archMap"])
    assert decide(profile, "read", (0, 0)) == {ALLOW}


def test_gvisor_allows_what_it_does_not_refuse() -> None:
    # Debian's runsc answers EPERM to every refused call, so nothing may be refused by default.
    profile = load(GVISOR)
    assert profile["defaultAction"] == ALLOW
    assert all(rule["action"] != ALLOW for rule in profile["syscalls"])
