"""The test cluster, like the embedded default's (rlsys.controller.cluster.start_ray), listens on
loopback only: nothing the tests start is reachable from another machine."""

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.integration


def _listening(proc: psutil.Process) -> list[str]:
    try:
        return [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:  # a worker that exited meanwhile (gone, or a zombie not yet reaped)
        return []


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:2])
    except psutil.Error:
        return f"pid {proc.pid} (exited)"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None) is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_the_ray_cluster_listens_on_loopback_only(ray_cluster):
    node = ray_cluster._private.worker._global_node
    assert node.node_ip_address == "127.0.0.1", node.node_ip_address
    assert node.gcs_address.startswith("127.0.0.1:"), node.gcs_address

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]  # ray.init started the GCS and the raylet, which start the workers
    names = {p.pid: _name(p) for p in procs}
    assert any("raylet" in n for n in names.values()), names  # the walk reaches Ray's processes
    listening = {pid: ips for pid, ips in ((p.pid, _listening(p)) for p in procs) if ips}
    assert len(listening) >= 3, listening  # the driver, the GCS, the raylet at least
    exposed = {names.get(pid, pid): ips for pid, ips in listening.items() if not all(map(_loopback, ips))}
    assert exposed == {}, f"listening beyond loopback: {exposed}"
