"""Routing between served models: one extra model name (`auto` by default) whose requests a router sends to the
cheapest model that will do.

- signals.py: a generated answer's confidence (mean or minimum token logprob, entropy, agreement of samples).
- config.py: router files (YAML; `cairn router train` writes a directory) and the pure decisions of each type:
  rules (prompt length, regular expressions, the requested name), learned (a classifier over the small model's
  hidden states), cascade (answer cheaply, escalate when unsure).
- learned.py: the classifier, its features and its training.
- curve.py: the cost-quality curve of a router against random routing, and what RouteLLM reports of it.
- commands.py: `cairn router train | calibrate | eval`.

Serving (cairn/serve/routed.py) asks a router what to do; nothing here imports HTTP.
"""
