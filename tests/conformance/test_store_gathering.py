"""Group commit under `durability = "sync"` (docs/STORE.md, "What an fsync
costs"): the store's writer gathers writes for up to `sync_linger_ms` after a
round that stored several messages. A client's own PUBACKs then wait for
that round, but messages *to* the client must not wait with them: MQTT orders
PUBACKs only among themselves [MQTT-4.6.0-2], and a backend that both
publishes and subscribes would otherwise get every message up to a whole
gathering period late.
"""

from __future__ import annotations

import time

import pytest
import paho.mqtt.client as mqtt

from helpers import Client, unique

pytestmark = pytest.mark.millet_only("Millet's store and its group commit")

# Long enough that "waited for the round" and "did not" cannot be confused
# on a loaded machine.
LINGER_MS = 3000


def test_deliveries_do_not_wait_behind_the_clients_pending_pubacks(millet_config, tmp_path):
    b = millet_config(
        f'listen = ["127.0.0.1:{{PORT}}"]\ndata_dir = "{tmp_path}"\n'
        f"[store]\ndurability = \"sync\"\nsync_linger_ms = {LINGER_MS}\n"
    )
    # An offline persistent session makes every message to "stored/#" a
    # stored one (so its PUBACK waits for the store).
    keeper = Client(b, client_id=unique("keeper"), clean_session=False)
    keeper.connect()
    keeper.subscribe("stored/#", qos=1)
    keeper.disconnect()
    keeper.stop()

    backend = Client(b, client_id=unique("backend"), clean_session=False)
    backend.c.max_inflight_messages_set(100)
    backend.connect()
    inbox = f"to/{backend.client_id}"
    backend.subscribe(inbox, qos=1)
    # Bursts of stored messages until one is acknowledged only after a
    # gathered round (a round that stored several messages, after which the
    # writer gathers for the full LINGER_MS): the next round is gathered too.
    gathering = False
    for burst in range(5):
        start = time.monotonic()
        infos = [backend.c.publish(f"stored/{burst}/{i}", b"x", 1) for i in range(10)]
        backend._wait(lambda: any(i.mid in backend._published for i in infos) or None,
                      LINGER_MS / 1000 + 10, "a burst's first PUBACK")
        first = time.monotonic() - start
        backend._wait(lambda: all(i.mid in backend._published for i in infos) or None,
                      LINGER_MS / 1000 + 10, "a burst's PUBACKs")
        # Even the first waited: the whole burst arrived while the writer
        # gathered, and was stored in one round.
        if first > LINGER_MS / 1000 / 3:
            gathering = True
            break
    assert gathering, "the store never gathered a round"

    # The next stored message's PUBACK waits for the gathered round...
    sent = time.monotonic()
    info = backend.c.publish("stored/late", b"x", 1)
    # ... while a message to the backend arrives at once.
    other = Client(b)
    other.connect()
    other.publish(inbox, b"hello", qos=0)
    got = backend.messages.wait_topic(inbox, timeout=LINGER_MS / 1000 + 10)
    delivered_after = got[0].received_at - sent
    backend._wait(lambda: backend._published.get(info.mid), LINGER_MS / 1000 + 10, "late PUBACK")
    acked_after = time.monotonic() - sent
    assert info.rc == mqtt.MQTT_ERR_SUCCESS
    # The setup did what it says: the PUBACK waited for the gathered round.
    assert acked_after > LINGER_MS / 1000 / 3, f"PUBACK after {acked_after:.3f}s: no gathering?"
    assert delivered_after < acked_after / 2, (
        f"a message to the client waited {delivered_after:.3f}s, "
        f"behind its own PUBACK ({acked_after:.3f}s)"
    )
    other.stop()
    backend.stop()
