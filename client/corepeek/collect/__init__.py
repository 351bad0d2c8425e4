"""Fleet-wide collection: list processes on many agents, capture every match, write a manifest.

``corepeek collect`` (see docs/fleet.md) does, for a set of agents:

1. **discover** the agents: an address list, a file of addresses, or the pods
   of the agent DaemonSet found through the Kubernetes API;
2. **list** the processes that match ``--comm/--exe/--pid`` on every agent
   (filtered server-side by ``ListProcesses``), concurrently, retrying
   ``UNAVAILABLE`` with exponential backoff and jitter;
3. **capture** every match (pinned to its start time), at most
   ``concurrency`` at once and ``per_host`` per agent, again retrying
   ``UNAVAILABLE`` (and ``ABORTED``: another session holds the pid);
4. **store** each core — a sparse file (uncompressed), a zstd file, or an S3
   object — *after* its capture is closed, so compression and upload never
   prolong a freeze;
5. write the run's manifest (``manifest-UTCSTAMP.json``, never replaced; see
   :mod:`corepeek.runindex`): one entry per capture and one per agent that
   could not be listed, each with a status; append the run to ``runs.json``
   and copy the manifest to ``manifest.json`` (the newest run's).

One concern per module, the decisions unit-testable without I/O:

- :mod:`.endpoints`: agent address lists and Kubernetes discovery;
- :mod:`.plan`: the selection, the capture plan and the cores' file names;
- :mod:`.runner`: bounded concurrency (overall and per host), retries, backoff;
- :mod:`.manifest`: the capture records and the manifest document;
- :mod:`.sinks`: storing a core (directory or S3) with its size, sha256, zstd;
- :mod:`.progress`: the terminal progress bars;
- :mod:`.collector`: the run itself, channels and captures, over all of the above.

The names below are the package's API (the CLI and the tests use them).
"""

from __future__ import annotations

from ..errors import CaptureError
from .collector import CollectConfig, Collector, CollectResult, collect
from .endpoints import (DEFAULT_K8S_NAMESPACE, DEFAULT_K8S_SELECTOR, DEFAULT_PORT, Endpoint,
                        PodLister, discover_kubernetes, format_host_port, parse_agent_list,
                        pod_endpoint, read_agents_file)
from .manifest import (MANIFEST_NAME, MANIFEST_VERSION, CaptureRecord, build_manifest,
                       iso_utc, unreachable_record)
from .plan import (MODES, AgentResult, Match, NameClaims, Selection, capture_name,
                   default_out_dir, host_of, matches_from_listing, plan_captures,
                   progress_hosts, safe_component, utc_stamp)
from .progress import Progress
from .runner import LIST_RETRYABLE, RETRYABLE, backoff_delays, run_bounded
from .sinks import (CHUNK, DirSink, S3Location, S3Sink, Scratch, Sink, Stored, file_digest,
                    parse_s3_url, zstd_compress)

__all__ = [
    "CHUNK", "DEFAULT_K8S_NAMESPACE", "DEFAULT_K8S_SELECTOR", "DEFAULT_PORT", "LIST_RETRYABLE",
    "MANIFEST_NAME", "MANIFEST_VERSION", "MODES", "RETRYABLE", "AgentResult", "CaptureError",
    "CaptureRecord", "CollectConfig", "CollectResult", "Collector", "DirSink", "Endpoint",
    "Match", "NameClaims", "PodLister", "Progress", "S3Location", "S3Sink", "Scratch",
    "Selection", "Sink", "Stored", "backoff_delays", "build_manifest", "capture_name", "collect",
    "default_out_dir", "discover_kubernetes", "file_digest", "format_host_port", "host_of",
    "iso_utc", "matches_from_listing", "parse_agent_list", "parse_s3_url", "plan_captures",
    "pod_endpoint", "progress_hosts", "read_agents_file", "run_bounded", "safe_component",
    "unreachable_record", "utc_stamp", "zstd_compress",
]
