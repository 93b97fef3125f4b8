"""The wire contract: records, SSE framing and the path gate. No I/O here.

docs/protocol.md is the written form of this package; keep the two in step.
"""
