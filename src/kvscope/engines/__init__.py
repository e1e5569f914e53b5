"""Engines: read vLLM / SGLang (and kvscope serve) metrics and start-up logs, and turn the planner into their flags.

`Watcher` scrapes /metrics and finds KV pressure, preemption or retraction storms, low prefix-hit rates, queueing and
SGLang's evictable radix tokens; `advise` predicts each engine's KV capacity from its own memory accounting and
prints its flags; `parse_log` reads their start-up capacity lines back. Imports neither torch nor transformers.
"""

from __future__ import annotations
