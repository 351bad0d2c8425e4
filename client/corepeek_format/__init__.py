"""corepeek_format: the pure core-format logic both the agent and the client use.

ELF record structs (:mod:`.elfstructs`), byte-range arithmetic (:mod:`.ranges`),
the dynamic linker walk over a read callback (:mod:`.dynlink`) and the planning
of the ranges a partial capture keeps (:mod:`.regions`).  No gRPC, no ptrace,
no I/O of its own: the agent (``corepeek_agent``) and the client library
(``corepeek``) both import it, and it imports neither, so each side installs
and tests without the other's code.
"""
