"""Names other layers register and `alignkit.config` validates against, kept below `config` so that
the configuration imports nothing from `train/`, `eval/` or `report/` (docs/architecture.md):
recipes (`recipes`), health-monitor rules (`health`) and experiment trackers (`trackers`). Metadata
only: no torch, no tracker packages."""
