"""nvmetd's OPI storage API (opiproject/opi-api `storage/`): the vendor-neutral gRPC control API of DPU storage,
served on the same Manager and durable store as the HTTP API, so both APIs see and change one state.

The generated stubs are pydpu 0.2.1's (pinned): the same OPI client library DPU users run, so the messages our
server parses are exactly those that client sends; see `stubs.py`.
"""
