"""Many threads attach and detach at random: records, API and guests must agree."""

from __future__ import annotations

import collections
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from hostagent.api.models import DetachResult
from hostagent.client import ApiError
from tests.integration.support import Daemon, Guests, LoopDevices, local_request, unique

GUESTS = 8
VOLUMES = 3
THREADS = 12
OPERATIONS = 160


def test_random_concurrent_attach_detach_keeps_every_invariant(
    daemon: Daemon, guests: Guests, loops: LoopDevices
) -> None:
    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    client = daemon.client
    domains = [guests.make() for _ in range(GUESTS)]
    devices = [loops.make(4) for _ in range(VOLUMES)]
    volumes = [unique(f"vol{n}") for n in range(VOLUMES)]
    # (guest index, volume index) -> attachment id while attached
    attached: dict[tuple[int, int], str] = {}
    pair_locks = {(g, v): threading.Lock() for g in range(GUESTS) for v in range(VOLUMES)}
    results: list[tuple[int, DetachResult]] = []
    errors: list[str] = []
    plan = [(rng.randrange(GUESTS), rng.randrange(VOLUMES)) for _ in range(OPERATIONS)]

    def detach(volume: int, attachment_id: str) -> None:
        result = client.detach(attachment_id)
        results.append((volume, result))

    def operate(pair: tuple[int, int]) -> None:
        g, v = pair
        with pair_locks[pair]:
            try:
                if pair in attached:
                    detach(v, attached.pop(pair))
                else:
                    attachment_id = unique("att")
                    client.attach(
                        attachment_id,
                        local_request(
                            devices[v], domains[g], volume_id=volumes[v], multiattach=True
                        ),
                    )
                    attached[pair] = attachment_id
            except ApiError as exc:
                errors.append(f"{pair}: {exc}")

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(operate, plan))
    assert errors == [], f"seed {seed}"

    # Mid-way agreement: the store (API), libvirt XML and the refcounts.
    listed = {a.attachment_id: a for a in client.list()}
    assert set(listed) == set(attached.values())
    assert all(a.state == "attached" for a in listed.values())
    for (g, v), attachment_id in attached.items():
        disk = domains[g].disk(f"ua-{attachment_id}")
        assert disk is not None
        assert disk.find("./source").get("dev") == devices[v]  # type: ignore[union-attr]
    ours = {f"ua-{i}" for i in attached.values()}
    for guest in domains:
        assert guest.aliases() <= ours, f"{guest.name} holds a disk nobody recorded"
    per_device = collections.Counter(devices[v] for _, v in attached)
    connections = {c.device_path: c for c in client.connections().connections}
    assert set(connections) == set(per_device)
    for device, count in per_device.items():
        assert connections[device].host_refcount == count

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda item: detach(item[0][1], item[1]), list(attached.items())))
    assert client.list() == []
    assert client.connections().connections == []
    assert all(guest.aliases() == set() for guest in domains)

    # terminate_connection exactly once per release: on every detach that
    # left no user, and only there; and as many releases as connects.
    for _, result in results:
        assert result.terminate_connection == result.host_disconnected
        assert result.terminate_connection == (result.host_refcount == 0)
    log = daemon.log()
    for v, device in enumerate(devices):
        connects = len(re.findall(rf"\bconnecting local:{device}\b", log))
        releases = sum(1 for vol, r in results if vol == v and r.terminate_connection)
        assert releases >= 1
        assert connects == releases, f"volume {v}: {connects} connects, {releases} releases"
