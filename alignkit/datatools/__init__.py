"""Alignment data tools (`alignkit data synth|judge|pairs|rewrite|select|principles`, `alignkit
iterate`): synthesise, judge, select and explain preference data. Every command reads and writes
JSONL that `alignkit train` reads, and works with a local model or an OpenAI-compatible endpoint
(`alignkit.generation.text_models`)."""
