"""Hostile Zenoh samples against a real bridge process (issue 13, fault 3): a header of `[` nested
200,000 deep once killed the bridge's executor thread with a RecursionError. Now it is one
counted malformed sample, and the next valid sample still reaches the robot's bus."""
import struct

import zenoh

from loom_ros.bridge import codec
from loom_ros.bridge.bridge_node import SAMPLE_SLACK_BYTES
from loom_ros.bus.event import DEFAULT_MAX_PAYLOAD_BYTES, Event

KEY = 'loom/rh/fleet/cmd'


def _sample(header: bytes, payload: bytes = b'') -> bytes:
    return struct.pack('>BI', codec.VERSION, len(header)) + header + payload


def test_deeply_nested_and_oversized_samples_are_counted_and_the_bridge_keeps_serving(
        ros, port, zenoh_router, zsession, bridge, robot_bus):
    zenoh_router(port)
    proc, status, _ = bridge('/rh', port, inbound=['fleet.**'])
    bus = robot_bus('/rh')
    got = []
    bus.subscribe('fleet.cmd', lambda e, t: got.append(e))
    session = zsession(port)
    # First a valid command through: the route to the bridge's subscriber exists, so the hostile
    # samples below (sent once each) are not lost to a subscription still propagating.
    before = Event.with_json('cmd', {'go': True})
    ros.wait_for(lambda: bool(got), 'a valid command on the robot bus before the attack',
                 spin=lambda: session.put(KEY, codec.encode(before)), alive=[proc])
    got.clear()

    hostile = [
        _sample(b'[' * 200_000),                        # the sample of the issue
        _sample(b'{"id":' + b'[' * 200_000),            # the same nesting inside an object
        _sample(b'{"id":1' + b'0' * 100_000 + b'}'),    # an integer too long to read
        struct.pack('>BI', codec.VERSION, 2**32 - 1) + b'{',  # a header length past the bound
    ]
    for data in hostile:   # BLOCK: Zenoh's default (DROP) may shed a big sample on a busy machine
        session.put(KEY, data, congestion_control=zenoh.CongestionControl.BLOCK)
    ros.wait_for(lambda: status.get('rejected_malformed') == len(hostile),
                 'every hostile sample counted as malformed', alive=[proc])
    # Longer than any event the bridge could take (review finding: samples were copied out of
    # Zenoh whole, and the inbox bounded by count only): dropped on Zenoh's thread, counted.
    huge = DEFAULT_MAX_PAYLOAD_BYTES + SAMPLE_SLACK_BYTES + 1
    session.put(KEY, b'[' * huge, congestion_control=zenoh.CongestionControl.BLOCK)
    ros.wait_for(lambda: status.get('dropped_oversize') == 1, 'the oversized sample dropped',
                 alive=[proc])
    assert status.get('rejected_malformed') == len(hostile)   # never reached the parser

    command = Event.with_json('cmd', {'stop': True})
    ros.wait_for(lambda: command in got, 'a valid command on the robot bus after the attack',
                 spin=lambda: session.put(KEY, codec.encode(command)), alive=[proc])
    assert proc.popen.poll() is None
