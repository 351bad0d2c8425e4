"""Pure ELF core construction: layout, notes and dump filtering, no OS calls.

Everything here takes plain dataclasses (see :mod:`.model`) and returns bytes
or tables, so it can be unit-tested without a live process.
"""
