"""corepeek agent: freezes live processes and serves their ELF cores over gRPC."""
