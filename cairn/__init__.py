"""cairn: build, adapt and serve language models on the hardware people already own."""

__version__ = "0.1.0"
