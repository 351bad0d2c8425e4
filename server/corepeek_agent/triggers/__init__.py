"""Triggers the agent evaluates itself: when a watched process crosses a
condition, the agent captures it into its store (docs/fleet.md).

``spec`` (what a trigger is, validated), ``evaluate`` (pure: samples in,
firings out), ``sampler`` (the /proc reads), ``config`` (the --triggers file),
``engine`` (the sampling thread and the firings).
"""
