"""The agent's bounded store of captures on its own host (docs/fleet.md).

``safedir`` (the directory and its files, without following links),
``frames`` (a core as independently decompressible zstd frames, holes left
out), ``limits`` (which entries go, oldest first: pure), ``index`` (SQLite),
``store`` (the store itself).
"""
