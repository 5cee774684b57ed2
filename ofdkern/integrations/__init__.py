"""Plug-ins for distillation frameworks; each submodule needs its framework installed and registers ofdkern with
it on import (``import ofdkern.integrations.torchdistill``)."""
