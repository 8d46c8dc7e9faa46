"""The OCI runtime config `run` hands runc, and the image's user as looked up in the image itself."""

from __future__ import annotations

import os
import pathlib

import pytest

from imagestream_cli import sandbox


def test_the_config_isolates_as_a_container_runtime_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = sandbox.oci_config(tmp_path, ["sh"], {"PATH": "/bin", "A": "b=c"}, "/srv", 1000, 100, [5])
    assert {n["type"] for n in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    process = spec["process"]
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": 1000, "gid": 100, "additionalGids": [5]}
    assert process["cwd"] == "/srv" and process["env"] == ["PATH=/bin", "A=b=c"]
    caps = process["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}  # nothing inheritable or ambient
    assert "CAP_SYS_ADMIN" not in caps["bounding"] and "CAP_SYS_PTRACE" not in caps["bounding"]
    assert len(caps["bounding"]) == 14
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/proc"]["type"] == "proc" and mounts["/dev"]["type"] == "tmpfs"
    assert "ro" in mounts["/sys"]["options"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"] and "/proc/sys" in spec["linux"]["readonlyPaths"]
    assert spec["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert spec["root"] == {"path": str(tmp_path), "readonly": False}


def test_host_network_shares_the_namespace_and_the_resolver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = sandbox.oci_config(tmp_path, ["sh"], {}, network="host")
    assert "network" not in {n["type"] for n in spec["linux"]["namespaces"]}
    if os.path.isfile("/etc/resolv.conf"):
        assert any(m["destination"] == "/etc/resolv.conf" and "ro" in m["options"] for m in spec["mounts"])
    with pytest.raises(ValueError):
        sandbox.oci_config(tmp_path, ["sh"], {}, network="bridge")
    assert sandbox.oci_config(tmp_path, ["sh"], {}, "relative/dir")["process"]["cwd"] == "/"


def test_a_seccomp_allowlist_denies_what_a_container_must_not_do(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seccomp = sandbox.oci_config(tmp_path, ["sh"], {})["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["defaultErrnoRet"] == 1  # EPERM
    allowed = {n for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
               for n in rule["names"]}
    assert {"read", "write", "openat", "execve", "futex", "mmap", "socket", "setuid"} <= allowed
    for denied in ("mount", "umount2", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "ptrace",
                   "perf_event_open", "kexec_load", "init_module", "reboot", "pivot_root", "open_by_handle_at",
                   "fsopen", "move_mount", "clone3", "clone", "personality"):
        assert denied not in allowed, denied
    (clone,) = [r for r in seccomp["syscalls"] if r["names"] == ["clone"]]
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    (clone3,) = [r for r in seccomp["syscalls"] if r["names"] == ["clone3"]]
    assert clone3["errnoRet"] == 38  # ENOSYS: libc falls back to clone, whose flags are checked


def image_root(tmp_path: pathlib.Path, passwd: str, group: str) -> pathlib.Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(passwd)
    (tmp_path / "etc/group").write_text(group)
    return tmp_path


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\naudio:x:29:other\n"


@pytest.mark.parametrize("spec, expected", [
    ("app", (1000, 1000, [50], "/home/app")),
    ("1000", (1000, 1000, [50], "/home/app")),
    ("app:staff", (1000, 50, [], "/home/app")),
    ("app:29", (1000, 29, [], "/home/app")),
    ("4242", (4242, 0, [], None)),  # a uid the image does not list is fine, as in docker
    ("4242:4343", (4242, 4343, [], None)),
])
def test_user_is_resolved_in_the_image(tmp_path, spec, expected) -> None:  # type: ignore[no-untyped-def]
    assert sandbox.resolve_user(spec, image_root(tmp_path, PASSWD, GROUP)) == expected


def test_unknown_user_or_group_names_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = image_root(tmp_path, PASSWD, GROUP)
    with pytest.raises(sandbox.SandboxError, match="no user 'nobody-here'"):
        sandbox.resolve_user("nobody-here", root)
    with pytest.raises(sandbox.SandboxError, match="no group 'wheel'"):
        sandbox.resolve_user("app:wheel", root)


def test_a_passwd_that_links_out_of_the_image_is_not_followed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = tmp_path / "host-passwd"
    host.write_text("secret:x:77:77::/s:/bin/sh\n")
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to(host)
    with pytest.raises(sandbox.SandboxError, match="no user 'secret'"):
        sandbox.resolve_user("secret", root)
    (root / "etc/passwd").unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(tmp_path)  # a linked directory is not followed either
    (tmp_path / "passwd").write_text("secret:x:77:77::/s:/bin/sh\n")
    with pytest.raises(sandbox.SandboxError, match="no user 'secret'"):
        sandbox.resolve_user("secret", root)
