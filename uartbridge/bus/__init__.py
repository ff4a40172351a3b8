"""The register bus: a frame codec (``codec``) and the asyncio server (``server``).

A guest (an emulator, ``uartbridge.client``, the reference driver) connects to one socket per
UART and speaks length-prefixed binary frames; ``docs/bus-protocol.md`` is the normative
description, these modules one implementation of it.
"""

from .codec import (
    MAX_BURST,
    MAX_FRAME_LEN,
    PROTOCOL_VERSION,
    SERVER_CAPABILITIES,
    BusRefusedError,
    Capability,
    ErrorCode,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Hello,
    HelloReply,
    IrqEvent,
    Read,
    ReadN,
    ReadNReply,
    ReadReply,
    Sync,
    SyncReply,
    Write,
    WriteN,
    decode_frame,
    encode,
)
from .server import BusServer, VirtualWire, accept_all_settle

__all__ = [
    "MAX_BURST",
    "MAX_FRAME_LEN",
    "PROTOCOL_VERSION",
    "SERVER_CAPABILITIES",
    "BusRefusedError",
    "BusServer",
    "Capability",
    "ErrorCode",
    "ErrorFrame",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "Hello",
    "HelloReply",
    "IrqEvent",
    "Read",
    "ReadN",
    "ReadNReply",
    "ReadReply",
    "Sync",
    "SyncReply",
    "VirtualWire",
    "Write",
    "WriteN",
    "accept_all_settle",
    "decode_frame",
    "encode",
]
