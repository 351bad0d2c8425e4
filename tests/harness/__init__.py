"""Test harness for corepeek: real target programs (targets), post-capture checks
(checks) and independent core readers (tools). See each module's docstring."""
